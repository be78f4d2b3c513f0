-- Citation counts and rates are consistent: matching answers are verifiable, rates lie in [0, 1].
select model, n, format, answers, citing, verifiable, matching, citation_rate, match_rate, citation_accuracy
from marts.citation_summary
where citing > answers
    or verifiable > answers
    or matching > verifiable
    or citation_rate not between 0 and 1
    or match_rate not between 0 and 1
    or citation_accuracy not between 0 and 1
