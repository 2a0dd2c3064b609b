"""Test-only launcher: axolotl's own ``train`` CLI under torchrun on a machine with no
GPU.

Usage (one process per rank)::

    # DDP over gloo
    ACCELERATE_USE_CPU=true OMP_NUM_THREADS=1 \\
        torchrun --nproc_per_node 2 tests/distributed/launcher.py cfg.yml
    # FSDP2 (cfg.yml has `fsdp_version: 2` and `fsdp_config`): as DDP
    # DeepSpeed ZeRO-2/3 (cfg.yml has `deepspeed: <json>`); no ACCELERATE_USE_CPU here
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 \\
        torchrun --nproc_per_node 2 tests/distributed/launcher.py cfg.yml

``torchrun -m axolotl.cli.train`` alone fails on CPU. This module changes six things,
each only when ``torch.cuda.is_available()`` is False, then hands over to
``axolotl.cli.train.do_cli`` (the same entry point as ``python -m axolotl.cli.train``):

1. ``normalize_config`` ends with ``device_map = {"": LOCAL_RANK}`` whenever
   WORLD_SIZE > 1, i.e. a CUDA device index. We wrap it so the map becomes
   ``{"": "cpu"}``. It is wrapped where ``load_cfg`` looks it up
   (``axolotl.cli.config``) and where the Ray worker path does
   (``axolotl.utils.config``).
2. DeepSpeed may be asked for ``nccl`` (axolotl's single-process DeepSpeed path passes
   ``dist_backend="nccl"`` literally). ``deepspeed.comm.init_distributed`` is wrapped
   to use ``gloo`` instead. The patch is installed from ``setup_deepspeed_env``, so a
   DDP run never imports DeepSpeed.
3. ``prepare_optim_env`` calls ``check_cuda_p2p_ib_support``, which ends in
   ``torch.cuda.can_device_access_peer``. CPU torch raises an AssertionError that
   axolotl catches; CUDA torch without a driver (the 0.21 / Python 3.12 environment)
   raises a RuntimeError that it does not. We make the check answer True (nothing to
   disable).
4. Under DeepSpeed, accelerate finds no device backend on CPU and reports one process
   on every rank (so both ranks would read the same batches and both write the output
   directory). Its backend becomes ``gloo`` (see ``_deepspeed_sees_every_rank``), and
   the Trainer sees the real world size, as with ``nccl`` on GPUs.
5. DeepSpeed's CPU shared-memory all-reduce op is not built (a gcc build of up to
   minutes on a busy machine; see ``_skip_shm_comm_op``): gloo does the all-reduces.
6. FSDP: accelerate keeps ``MULTI_CPU`` (plain DDP) although ``ACCELERATE_USE_FSDP``
   is set, and axolotl builds the device mesh on ``"cuda"``. The state becomes
   ``FSDP`` and the mesh a CPU one (see ``_fsdp_on_cpu``); torch's ``fully_shard``
   runs over gloo unchanged.

It also refuses the two silent misconfigurations seen on CPU: DeepSpeed together with
``ACCELERATE_USE_CPU`` (ZeRO-2 silently trains without DeepSpeed, ZeRO-3 crashes), and a
multi-process non-DeepSpeed run without ``ACCELERATE_USE_CPU`` (every rank trains
alone).

With ``MOTE_LAUNCHER_REPORT_DIR=<dir>`` each rank writes ``rank{N}.json`` after
``Trainer.train`` returns: process-group backend and size, accelerate's distributed
type, the wrapped model class, the ZeRO stage, parameter counts and the Trainer's log
history (what the tests assert). Rank 0 also writes ``trained.safetensors`` (every
trainable parameter, gathered under ZeRO-3) and ``probe.pt`` (the trained model's logits
on the first training row, under MoTE routing), which the tests compare with the saved
adapter.

Works with axolotl 0.19 and 0.21; each patch target is looked up with ``getattr`` and a
missing one is reported, not ignored silently.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

LOG = logging.getLogger("mote.launcher")

_TRUE = {"1", "true", "yes", "on"}

# If set to a directory, every rank writes rank{N}.json there after training (tests).
REPORT_ENV = "MOTE_LAUNCHER_REPORT_DIR"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def _no_gpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def _warn_missing(module: str, attr: str) -> None:
    import axolotl

    LOG.warning(
        "launcher: %s.%s not found in axolotl %s; that patch is skipped",
        module,
        attr,
        getattr(axolotl, "__version__", "?"),
    )


def _check_launch_env(cfg) -> None:
    """Refuse the CPU multi-process combinations that fail silently."""
    if cfg.world_size <= 1:
        return
    use_cpu = _env_true("ACCELERATE_USE_CPU")
    if cfg.deepspeed and use_cpu:
        raise RuntimeError(
            "launcher: `deepspeed:` is set and ACCELERATE_USE_CPU=true; on CPU this "
            "drops DeepSpeed (ZeRO-1/2) or crashes (ZeRO-3). Unset ACCELERATE_USE_CPU "
            "and set DS_ACCELERATOR=cpu for DeepSpeed runs."
        )
    if not cfg.deepspeed and not use_cpu:
        raise RuntimeError(
            "launcher: WORLD_SIZE > 1 without a GPU and without DeepSpeed: set "
            "ACCELERATE_USE_CPU=true, otherwise accelerate sees no distributed setup "
            "and every rank trains on its own."
        )


def _wrap_normalize_config() -> None:
    import axolotl.cli.config as cli_config
    import axolotl.utils.config as utils_config

    original = getattr(utils_config, "normalize_config", None)
    if original is None:
        raise RuntimeError("launcher: axolotl.utils.config.normalize_config not found")
    if getattr(original, "_mote_cpu_wrapped", False):
        return

    @functools.wraps(original)
    def normalize_config(cfg):
        result = original(cfg)
        if cfg.world_size > 1:
            _check_launch_env(cfg)
            cfg.device_map = {"": "cpu"}
        return result

    normalize_config._mote_cpu_wrapped = True
    utils_config.normalize_config = normalize_config
    if hasattr(cli_config, "normalize_config"):
        cli_config.normalize_config = normalize_config
    else:
        _warn_missing("axolotl.cli.config", "normalize_config")


def _gloo_instead_of_nccl() -> None:
    """Wrap deepspeed.comm.init_distributed so that 'nccl' becomes 'gloo'."""
    import deepspeed.comm as ds_comm

    original = ds_comm.init_distributed
    if getattr(original, "_mote_cpu_wrapped", False):
        return

    @functools.wraps(original)
    def init_distributed(dist_backend=None, *args, **kwargs):
        if dist_backend == "nccl":
            dist_backend = "gloo"
        return original(dist_backend, *args, **kwargs)

    init_distributed._mote_cpu_wrapped = True
    ds_comm.init_distributed = init_distributed
    # ``deepspeed.init_distributed`` is the same function re-exported
    import deepspeed

    if getattr(deepspeed, "init_distributed", None) is original:
        deepspeed.init_distributed = init_distributed


def _wrap_setup_deepspeed_env() -> None:
    import axolotl.utils.trainer as trainer_utils

    original = getattr(trainer_utils, "setup_deepspeed_env", None)
    if original is None:
        _warn_missing("axolotl.utils.trainer", "setup_deepspeed_env")
        _gloo_instead_of_nccl()  # cannot defer: patch now
        return

    @functools.wraps(original)
    def setup_deepspeed_env(*args, **kwargs):
        _gloo_instead_of_nccl()
        _skip_shm_comm_op()
        return original(*args, **kwargs)

    trainer_utils.setup_deepspeed_env = setup_deepspeed_env


def _deepspeed_sees_every_rank() -> None:
    """Give accelerate a process-group backend for DeepSpeed on CPU.

    Under torchrun with ``ACCELERATE_USE_DEEPSPEED=true`` and no GPU, accelerate's
    ``PartialState._prepare_backend`` finds no device backend, so the state reports
    ``num_processes=1`` and ``process_index=0`` on *every* rank, although DeepSpeed's
    own group has all of them: both ranks then read the same batches and both write the
    output directory. On a GPU the backend is ``nccl`` and none of this happens. Here
    the backend becomes ``gloo`` with the CPU distributed type, which accelerate turns
    into ``DistributedType.DEEPSPEED`` right after, exactly as ``nccl`` would be.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original = PartialState._prepare_backend
    if getattr(original, "_mote_cpu_wrapped", False):
        return

    @functools.wraps(original)
    def _prepare_backend(self, *args, **kwargs):
        result, distributed_type = original(self, *args, **kwargs)
        cpu = kwargs.get("cpu", args[0] if args else False)
        if (
            result is None
            and not cpu
            and _env_true("ACCELERATE_USE_DEEPSPEED")
            and int(os.environ.get("LOCAL_RANK", "-1")) != -1
            and int(os.environ.get("WORLD_SIZE", "1")) > 1
        ):
            return "gloo", DistributedType.MULTI_CPU
        return result, distributed_type

    _prepare_backend._mote_cpu_wrapped = True
    PartialState._prepare_backend = _prepare_backend


def _fsdp_on_cpu() -> None:
    """Let accelerate run FSDP over gloo on CPU.

    ``AcceleratorState`` turns ``ACCELERATE_USE_FSDP`` into ``DistributedType.FSDP``
    only for device backends (``MULTI_GPU``, ``MULTI_XPU``, ...), never for
    ``MULTI_CPU``: on CPU the flag is dropped and every rank runs plain DDP. Here a
    ``MULTI_CPU`` state with ``ACCELERATE_USE_FSDP`` and an FSDP plugin becomes
    ``FSDP``, as it would on GPUs; torch's ``fully_shard`` itself runs on a CPU mesh.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_mote_cpu_wrapped", False):
        return

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin") or getattr(self, "fsdp_plugin", None)
        if (
            plugin is not None
            and _env_true("ACCELERATE_USE_FSDP")
            and self.distributed_type == DistributedType.MULTI_CPU
        ):
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin
            # PartialState() reads its own copy (accelerate syncs it the same way)
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    __init__._mote_cpu_wrapped = True
    AcceleratorState.__init__ = __init__

    # axolotl builds the FSDP device mesh on "cuda" literally
    from accelerate.parallelism_config import ParallelismConfig

    build = ParallelismConfig.build_device_mesh
    if getattr(build, "_mote_cpu_wrapped", False):
        return

    @functools.wraps(build)
    def build_device_mesh(self, device_type, *args, **kwargs):
        return build(self, "cpu", *args, **kwargs)

    build_device_mesh._mote_cpu_wrapped = True
    ParallelismConfig.build_device_mesh = build_device_mesh


def _skip_shm_comm_op() -> None:
    """Skip DeepSpeed's CPU shared-memory all-reduce op (a gcc build on first use).

    ``deepspeed.comm.torch.build_shm_op`` JIT-compiles ``deepspeed_shm_comm_op`` the
    first time a CPU process group starts: about 30 s on an idle 2-core machine and
    minutes on a busy one, once per Python environment. It only speeds up small
    all-reduces; without it DeepSpeed uses torch.distributed (gloo), the code path the
    tests are about. Set ``MOTE_LAUNCHER_DS_SHM=1`` to build and use it anyway.
    """
    if _env_true("MOTE_LAUNCHER_DS_SHM"):
        return
    import importlib

    # not `import deepspeed.comm.torch as ...`: deepspeed.comm re-exports the name
    # `torch` (the torch package), which that statement would return instead
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    if hasattr(ds_torch_comm, "build_shm_op"):
        ds_torch_comm.build_shm_op = lambda: None
    else:
        LOG.warning(
            "launcher: deepspeed.comm.torch.build_shm_op not found; not skipped"
        )


def _neutralise_p2p_check() -> None:
    import axolotl.utils.trainer as trainer_utils

    if not hasattr(trainer_utils, "check_cuda_p2p_ib_support"):
        _warn_missing("axolotl.utils.trainer", "check_cuda_p2p_ib_support")
        return
    trainer_utils.check_cuda_p2p_ib_support = lambda: True


def _offload_device(offload_config) -> str | None:
    """'cpu' / 'nvme' / 'none' of a ZeRO offload config, None when not configured."""
    device = getattr(offload_config, "device", None)
    return None if device is None else str(getattr(device, "value", device))


def _rank_report(trainer) -> dict:
    """What this rank actually ran: the evidence the tests assert on."""
    import torch
    import torch.distributed as dist

    model = trainer.model_wrapped
    params = list(trainer.model.named_parameters())
    trainable = [(n, p) for n, p in params if p.requires_grad]
    engine = getattr(trainer, "deepspeed", None)
    report = {
        "rank": int(os.environ.get("RANK", "0")),
        "env_world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "dist_initialized": dist.is_initialized(),
        "dist_backend": dist.get_backend() if dist.is_initialized() else None,
        "dist_world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "trainer_world_size": trainer.args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "wrapped_model_class": type(model).__name__,
        "is_deepspeed_enabled": bool(getattr(trainer, "is_deepspeed_enabled", False)),
        "zero_stage": engine.zero_optimization_stage() if engine is not None else None,
        "zero_offload": {
            "param": _offload_device(engine.zero_offload_param()),
            "optimizer": _offload_device(engine.zero_offload_optimizer()),
        }
        if engine is not None
        else None,
        "n_trainable_params": len(trainable),
        "trainable_numel": sum(
            int(getattr(p, "ds_numel", p.numel())) for _, p in trainable
        ),
        # ZeRO-3 marks every partitioned parameter with ds_id; local storage is a shard
        # (FSDP2: a DTensor whose local tensor is the shard)
        "trainable_local_numel": sum(_local_numel(p) for _, p in trainable),
        "n_dtensor_params": sum(1 for _, p in params if hasattr(p, "to_local")),
        # ZeRO-3 marks every parameter it manages with ds_id; a partitioned one keeps
        # only its shard locally (persistent small ones, below the persistence
        # threshold, stay whole on every rank)
        "n_zero3_params": sum(1 for _, p in params if hasattr(p, "ds_id")),
        "zero3_numel": sum(int(p.ds_numel) for _, p in params if hasattr(p, "ds_id")),
        "zero3_local_numel": sum(
            int(p.ds_tensor.numel()) for _, p in params if hasattr(p, "ds_tensor")
        ),
        "global_step": trainer.state.global_step,
        "log_history": trainer.state.log_history,
        "cuda_available": torch.cuda.is_available(),
    }
    return report


def _full(param):
    """The whole tensor of a parameter: an FSDP2 DTensor shard is all-gathered."""
    return param.full_tensor() if hasattr(param, "full_tensor") else param


def _local_numel(param) -> int:
    """Elements this rank stores: an FSDP2 DTensor keeps only its local shard."""
    return param.to_local().numel() if hasattr(param, "to_local") else param.numel()


def _dump_trained(trainer, out) -> None:
    """Rank 0 writes the trained parameters and the logits of a probe batch.

    ``trained.safetensors``: every trainable parameter, full (gathered under ZeRO-3),
    fp32, by its ``named_parameters`` name. ``probe.pt``: ``input_ids``, ``step_ids``
    and ``logits`` of the first training row, computed by the trained model under MoTE
    routing. Every rank takes part (ZeRO-3 gathers are collectives); rank 0 writes.
    """
    import contextlib

    import torch
    from safetensors.torch import save_file

    from axolotl_mote.routing import route
    from axolotl_mote.tuner.model import get_routing_state

    model = trainer.model
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for _, p in named):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in named])
    with gather:
        # FSDP2 parameters are DTensor shards: ``full_tensor`` all-gathers them;
        # activation checkpointing's wrapper adds a part to the names that PEFT's
        # adapter names do not have (spelt out here, not the plugin's constant: this
        # gather is the independent side of the saved-equals-trained check)
        tensors = {
            n.replace("_checkpoint_wrapped_module.", ""): _full(p)
            .detach()
            .float()
            .cpu()
            .clone()
            for n, p in named
        }

    row = trainer.train_dataset[0]
    ids = torch.tensor([row["input_ids"][:96]])
    steps = torch.tensor([row["step_ids"][:96]])
    was_training = model.training
    model.eval()
    with torch.no_grad(), route(get_routing_state(model), steps):
        logits = model(input_ids=ids).logits.float().cpu()
    model.train(was_training)
    if int(os.environ.get("RANK", "0")) == 0:
        save_file(tensors, str(out / "trained.safetensors"))
        torch.save(
            {"input_ids": ids, "step_ids": steps, "logits": logits}, out / "probe.pt"
        )


def _watch_lora_calls(model) -> tuple[dict, list, list]:
    """Count forward calls of every LoRA A/B module; record the stage ids routed per
    call.

    Returns (calls by module name, stage ids seen by the first LoRA layer per forward,
    hook handles). Evidence that every rank runs the same modules although the stages
    in its batches differ (rank symmetry, which ZeRO-3 needs).
    """
    from axolotl_mote.tuner.model import get_routing_state

    state = get_routing_state(model)
    calls: dict[str, int] = {}
    stages: list[list[int]] = []
    handles = []
    for name, module in model.named_modules():
        if not name.endswith((".lora_A.default", ".lora_B.default")):
            continue
        first = not calls
        calls[name] = 0

        def hook(mod, args, _name=name, _first=first):
            calls[_name] += 1
            if _first and state.is_set:
                stages.append(sorted(int(s) for s in state.step_ids.unique()))

        handles.append(module.register_forward_pre_hook(hook))
    return calls, stages, handles


def _wrap_trainer_train(report_dir: str) -> None:
    """After ``Trainer.train`` returns, write ``rank{N}.json`` into ``report_dir``."""
    import json
    from pathlib import Path

    import transformers

    original = transformers.Trainer.train
    if getattr(original, "_mote_report_wrapped", False):
        return

    @functools.wraps(original)
    def train(self, *args, **kwargs):
        calls, stages, handles = _watch_lora_calls(self.model)
        try:
            result = original(self, *args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        out = Path(report_dir)
        out.mkdir(parents=True, exist_ok=True)
        report = _rank_report(self)
        report["lora_calls"] = calls
        report["stages_per_forward"] = stages
        (out / f"rank{report['rank']}.json").write_text(json.dumps(report, indent=1))
        _dump_trained(self, out)
        return result

    train._mote_report_wrapped = True
    transformers.Trainer.train = train


def install_cpu_patches() -> bool:
    """Apply the CPU patches (no-op with a GPU). Returns whether they were applied."""
    if not _no_gpu():
        return False
    _wrap_normalize_config()
    _wrap_setup_deepspeed_env()
    _deepspeed_sees_every_rank()
    _neutralise_p2p_check()
    _fsdp_on_cpu()
    return True


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        raise SystemExit(
            "usage: torchrun --nproc_per_node N launcher.py CONFIG.yml [axolotl args]"
        )
    applied = install_cpu_patches()
    if os.environ.get(REPORT_ENV):
        _wrap_trainer_train(os.environ[REPORT_ENV])
    if int(os.environ.get("RANK", "0")) == 0:
        import axolotl

        print(
            f"[mote-launcher] axolotl {axolotl.__version__}, "
            f"world_size={os.environ.get('WORLD_SIZE', '1')}, cpu patches={applied}",
            flush=True,
        )
    import fire
    from axolotl.cli.train import do_cli

    # do_cli also re-reads sys.argv for TrainerCliArgs: present it as
    # `axolotl.cli.train`.
    sys.argv = ["axolotl.cli.train", *argv]
    fire.Fire(do_cli, command=argv)


if __name__ == "__main__":
    main()
