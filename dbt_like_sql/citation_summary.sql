-- Citation grounding per model, n and format, computed from the text alone (no LLM): how many answers
-- cite a volume / chapter / section (citation_rate), and how many cite the place where the knowledge
-- graph puts the question (match_rate over questions with a known location; citation_accuracy over the
-- answers that cite something checkable).
with grounding as (
    select
        model,
        cast(n as bigint) as n,
        format,
        question_id,
        coalesce(cites_location, false) as cites_location,
        citation_matches,
        match_level
    from eval.citation_grounding
    where coalesce(stage, 2) = 2
)

select
    model,
    n,
    format,
    count(*) as answers,
    count(*) filter (where cites_location) as citing,
    count(*) filter (where cites_location) / count(*) as citation_rate,
    count(citation_matches) as verifiable,
    count(*) filter (where citation_matches) as matching,
    count(*) filter (where citation_matches) / nullif(count(citation_matches), 0) as match_rate,
    count(*) filter (where citation_matches)
        / nullif(count(*) filter (where cites_location and citation_matches is not null), 0) as citation_accuracy,
    count(*) filter (where match_level = 'section') as section_matches,
    count(*) filter (where match_level = 'chapter') as chapter_matches,
    count(*) filter (where match_level = 'volume') as volume_matches
from grounding
group by model, n, format
order by model, n, format
