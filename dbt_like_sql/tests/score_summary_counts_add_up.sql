-- Parsed plus unparsed judgements make up the questions, and the 3/2/1/0 distribution sums to the parsed.
with distribution as (
    select model, n, format, judge, sum(count) as counted
    from marts.score_distribution
    group by model, n, format, judge
)
select s.model, s.n, s.format, s.judge, s.questions, s.scored, s.unparsed, d.counted
from marts.score_summary as s
left join distribution as d
    on d.model = s.model and d.n = s.n and d.format = s.format and d.judge = s.judge
where s.scored + s.unparsed <> s.questions
    or coalesce(d.counted, 0) <> s.scored
    or s.perfect_count <> coalesce((
        select count from marts.score_distribution as x
        where x.model = s.model and x.n = s.n and x.format = s.format and x.judge = s.judge
            and x.score = (select max(score) from marts.rubric_levels)
    ), 0)
