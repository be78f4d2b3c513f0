"""LoRA / QLoRA training of one (model, n) partition, behind one resource with three backends.

Backends (``LoraTrainer.backend``; ``auto``: on CUDA whichever of the first two was measured faster for the
run's memory, ``trainer_loading.select_backend``; else ``cpu_lora``):
- ``unsloth``: unsloth's ``FastLanguageModel`` 4-bit QLoRA, when unsloth is installed and CUDA is present;
- ``bnb_qlora``: transformers + bitsandbytes NF4 with double quantization, bf16 compute, peft LoRA, TRL;
- ``cpu_lora``: float32 weights on CPU with a peft LoRA, TRL's ``SFTTrainer`` (bf16 autocast on request).

All three train on the same pre-tokenized sequences (``training/chat_format.py``): labels are ``-100`` on the
prompt, so the loss covers answer tokens only. Runs are seeded, checkpoint every K optimizer steps into a
folder keyed by the plan and the data, and resume from the newest complete checkpoint when restarted
(Hugging Face's Trainer restores optimizer, scheduler, RNG and data position). The adapter is saved to a
temporary folder and renamed into place only after training finished, so a failed run never leaves an
adapter where the registry would look for one.

How a run is laid out on the device never changes what it computes; ``choose_layout`` decides and the run log
and ``TrainingResult.layout`` record it. On CUDA (bnb_qlora): padding-free rows with per-example flash
attention (``packed_attention.py``), micro-batch and checkpointing from free memory, compiled decoder layers,
the dequantize + matmul path for the NF4 projections (``nf4_linear.py``) and fused AdamW; the measured effect
of each is in docs/benchmarks/gpu.md.

With more than one CUDA device visible, training runs data-parallel: the resource starts this module's
command line under ``torchrun`` (or ``accelerate launch``), one process per GPU, and the Trainer handles
gradient all-reduce. There is no hand-written distributed loop. ``launcher="subprocess"`` runs the same
worker as one separate process on any device (the step's process stays small; CPU included).

Workers talk to the asset through Dagster Pipes (``python -m jpslm_assets.resources.trainer``, started by a
``PipesSubprocessClient`` or any other Pipes client, e.g. ``PipesK8sClient`` on a remote GPU host): the spec
arrives as the Pipes extra ``jpslm_training_spec``; progress lines are Pipes log messages; the result (adapter
path, loss curve, tokens/s, layout) comes back as a custom message, and so does a training error, so the
asset raises the same ``TrainingError`` / ``TrainingOutOfMemoryError`` as in-process. Only rank 0 of a
data-parallel run opens the Pipes message channel; the other ranks read the spec from the same context.

The pieces: ``trainer_spec`` (what a run is given and returns), ``trainer_layout`` (the device layout),
``trainer_loading`` (the backend and its model), ``trainer_loop`` (``prepare_run`` and ``run_training``); this
module holds the resource and the Pipes worker it starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import dagster as dg
from pydantic import Field

from jpslm_assets.resources.cpu import choose_cpu_precision, cpu_bf16_flags
from jpslm_assets.resources.trainer_loading import cuda_device_count, select_backend
from jpslm_assets.resources.trainer_loop import run_training
from jpslm_assets.resources.trainer_spec import (
    Backend,
    BackendChoice,
    ProgressSink,
    TrainingError,
    TrainingOutOfMemoryError,
    TrainingResult,
    TrainingSpec,
)

SPEC_EXTRA = "jpslm_training_spec"  # the Pipes extra that carries the TrainingSpec
RESULT_MESSAGE = "jpslm_training_result"  # custom-message kinds a worker reports
ERROR_MESSAGE = "jpslm_training_error"


class LoraTrainer(dg.ConfigurableResource):
    """Trains LoRA adapters; picks the backend and, with several GPUs, the data-parallel launcher."""

    backend: BackendChoice = Field(default="auto", description="auto, unsloth, bnb_qlora or cpu_lora")
    launcher: Literal["auto", "in_process", "subprocess", "torchrun", "accelerate"] = Field(
        default="auto",
        description="auto: in-process on CPU or one GPU, torchrun across all GPUs when more than one is visible; "
        "subprocess: one worker process through Dagster Pipes on any device",
    )
    num_processes: int | None = Field(
        default=None, description="GPUs to use when data-parallel (default: all)"
    )
    cpu_threads: int | None = Field(
        default=None, description="torch threads on CPU (default: the cores not already busy)"
    )
    cpu_precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description="CPU LoRA precision: auto (bf16 autocast where the CPU has AVX512-BF16 or AMX, else "
        "fp32), fp32, or bf16 autocast",
    )
    compile_layers: bool | None = Field(
        default=None,
        description="torch.compile each decoder layer: None = on CUDA when Triton is installed and gradient "
        "checkpointing is off, off on CPU; false for a model whose layers do not compile",
    )

    memory_budget_gib: float | None = Field(
        default=None,
        gt=0,
        description="CUDA: GPU memory each training run plans within and is capped at, in GiB (16 stands in for "
        "the paper's 16 GB card); None: the device's free memory",
    )

    def resolved_backend(self) -> Backend:
        return select_backend(self.backend, self.memory_budget_gib)

    def resolved_cpu_precision(self) -> tuple[str, str]:
        """(``fp32`` or ``bf16``, why) that CPU LoRA runs of this resource use on this machine."""
        return choose_cpu_precision(self.cpu_precision, cpu_bf16_flags())

    def launcher_for(self, backend: Backend) -> tuple[str, int]:
        """(launcher, processes) this resource would use for ``backend`` on this machine.

        ``single_gpu``: one worker process that sees only the first GPU. In-process training with several
        GPUs visible would make the Trainer wrap the model in ``nn.DataParallel``, which TRL refuses (and
        which is slower than DDP anyway).
        """
        gpus = cuda_device_count() if backend != "cpu_lora" else 0
        processes = min(self.num_processes or gpus, gpus) if gpus else 1
        if self.launcher == "subprocess":
            return ("single_gpu", 1) if gpus > 1 else ("subprocess", 1)
        if self.launcher == "in_process" and gpus <= 1:
            return "in_process", 1
        if backend == "unsloth" or processes <= 1 or self.launcher == "in_process":
            # unsloth's open-source release trains on one GPU; the others stay idle rather than diverge.
            return ("single_gpu", 1) if gpus > 1 else ("in_process", 1)
        return ("torchrun" if self.launcher == "auto" else self.launcher), processes

    def train(
        self,
        spec: TrainingSpec,
        sink: ProgressSink,
        context: dg.AssetExecutionContext | None = None,
        pipes_client: dg.PipesSubprocessClient | None = None,
    ) -> TrainingResult:
        """Train one adapter. Worker launchers need the asset's ``context`` (Dagster Pipes) and use
        ``pipes_client`` (default: a ``PipesSubprocessClient`` on this machine). Another Pipes client (a
        Kubernetes pod on a GPU host) runs the same ``worker_command`` with the same extras and hands its
        messages to ``worker_result``; the README shows how."""
        launcher, processes = self.launcher_for(spec.backend)
        if self.cpu_threads and spec.cpu_threads is None:
            spec = spec.model_copy(update={"cpu_threads": self.cpu_threads})
        if spec.backend == "cpu_lora" and self.resolved_cpu_precision()[0] == "bf16":
            spec = spec.model_copy(update={"cpu_bf16": True})
        if self.compile_layers is not None and spec.compile_layers is None:
            spec = spec.model_copy(update={"compile_layers": self.compile_layers})
        if self.memory_budget_gib is not None and spec.memory_budget_gib is None:
            spec = spec.model_copy(update={"memory_budget_gib": self.memory_budget_gib})
        if launcher == "in_process":
            return run_training(spec, sink)
        if context is None:
            raise TrainingError(
                f"partition {spec.partition}: the {launcher} launcher runs the worker through Dagster Pipes and "
                "needs the asset's execution context; pass context= (or use launcher='in_process')"
            )
        return self._train_in_workers(spec, sink, launcher, processes, context, pipes_client)

    def _train_in_workers(
        self,
        spec: TrainingSpec,
        sink: ProgressSink,
        launcher: str,
        processes: int,
        context: dg.AssetExecutionContext,
        pipes_client: dg.PipesSubprocessClient | None,
    ) -> TrainingResult:
        environment: dict[str, str] = {}
        if launcher == "single_gpu":
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
            environment["CUDA_VISIBLE_DEVICES"] = visible
        command = worker_command(launcher, processes)
        sink(f"{spec.partition}: training in {processes} worker process(es) via {launcher} (Dagster Pipes)")
        client = pipes_client or dg.PipesSubprocessClient()
        extras = {SPEC_EXTRA: spec.model_dump(mode="json")}
        try:
            invocation = client.run(context=context, command=command, extras=extras, env=environment)
        except dg.DagsterError as exc:
            raise TrainingError(
                f"partition {spec.partition}: the {launcher} training worker failed before reporting a result "
                f"({exc}); its output is in the step's logs"
            ) from exc
        return worker_result(spec, invocation.get_custom_messages())


def worker_command(launcher: str, processes: int) -> list[str]:
    """The worker's command line for a launcher (what a Pipes client runs)."""
    if launcher == "torchrun":
        prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    elif launcher == "accelerate":
        prefix = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={processes}"]
    elif launcher in ("subprocess", "single_gpu"):
        prefix = [sys.executable]
    else:
        raise TrainingError(f"unknown worker launcher {launcher!r}")
    return [*prefix, "-m", "jpslm_assets.resources.trainer"]


def worker_result(spec: TrainingSpec, messages: Sequence[Any]) -> TrainingResult:
    """The worker's reported result, or the training error it reported, raised as in-process."""
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        if message.get("kind") == ERROR_MESSAGE:
            error = TrainingOutOfMemoryError if message.get("out_of_memory") else TrainingError
            raise error(str(message.get("message")))
        if message.get("kind") == RESULT_MESSAGE:
            return TrainingResult.model_validate(message["result"])
    raise TrainingError(
        f"partition {spec.partition}: the training worker ended without reporting a result through Dagster "
        "Pipes; its output is in the step's logs"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Worker entry point (Dagster Pipes): train the spec from the Pipes context, report progress and result."""
    from dagster_pipes import PipesDefaultContextLoader, PipesEnvVarParamsLoader, open_dagster_pipes

    argparse.ArgumentParser(description="Train one LoRA adapter; started by a Dagster Pipes client.").parse_args(
        argv
    )
    if int(os.environ.get("RANK", "0")) != 0:
        # Other data-parallel ranks read the spec and train; only rank 0 reports through the message channel.
        params = PipesEnvVarParamsLoader().load_context_params()
        with PipesDefaultContextLoader().load_context(params) as data:
            spec = TrainingSpec.model_validate(data["extras"][SPEC_EXTRA])
        run_training(spec, lambda message: None)
        return 0
    with open_dagster_pipes() as pipes:
        spec = TrainingSpec.model_validate(pipes.get_extra(SPEC_EXTRA))
        try:
            result = run_training(spec, pipes.log.info)
        except TrainingError as exc:
            pipes.report_custom_message(
                {
                    "kind": ERROR_MESSAGE,
                    "message": str(exc),
                    "out_of_memory": isinstance(exc, TrainingOutOfMemoryError),
                }
            )
            return 0  # reported: the asset raises it with its own message
        pipes.report_custom_message({"kind": RESULT_MESSAGE, "result": result.model_dump(mode="json")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
