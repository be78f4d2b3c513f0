-- Every training run of both stages side by side, one row per adapter: stage 1 (the reference model over
-- the n grid, stage-1 LoRA shape) and stage 2 (every model at n*, stage-2 LoRA shape), with the CPU precision
-- each run chose and why. The per-stage tables stay the source of truth (train.stage1_runs, train.stage2_runs).
select
    stage,
    model,
    n,
    backend,
    precision,
    precision_reason,
    device,
    r,
    alpha,
    dropout,
    learning_rate,
    effective_batch_size,
    max_seq_length,
    examples,
    skipped_examples,
    steps,
    train_loss_final,
    tokens,
    tokens_per_s,
    minutes,
    trained_at,
    artifact_path,
    artifact_sha256
from (
    select * from train.stage1_runs
    union all by name
    select * from train.stage2_runs
)
order by stage, model, n
