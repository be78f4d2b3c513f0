-- The bootstrap interval contains the average and stays inside the rubric's range; a group with parsed
-- scores always has an interval.
select s.model, s.n, s.format, s.judge, s.avg_score, s.ci_low, s.ci_high
from marts.score_summary as s
where (s.scored > 0 and (s.ci_low is null or s.ci_high is null))
    or s.ci_low > s.avg_score + 1e-9
    or s.ci_high < s.avg_score - 1e-9
    or s.ci_low < (select min(score) from marts.rubric_levels) - 1e-9
    or s.ci_high > (select max(score) from marts.rubric_levels) + 1e-9
