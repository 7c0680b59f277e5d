"""Several training processes: which engine, the accelerator, and what a
sharded (FSDP2) policy needs to generate and to hand back its adapter.

A retrain runs in one process, or as several under ``accelerate launch``:
DDP by default, or FSDP (version 2) from an accelerate config file, which
shards the policy's weights, gradients and optimizer state across the
processes. Under FSDP every forward pass is a collective, so rollouts go
through the sharded root module's forward with ``synced_gpus`` (every
process keeps stepping until the longest reply is done), and
`gather_adapter` collects the trained LoRA weights whole. PPO itself
(`online_rl.ppo`) does not know which of these it runs under.
"""

from __future__ import annotations

import os

from torch import nn


class PolicyRoot(nn.Module):
    """The LoRA policy as the one module accelerate prepares (and FSDP wraps).

    Generation enters through this module's forward so that FSDP's hooks on
    the root gather its parameters (FSDP also requires the root's forward to
    come first)."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy
        base = policy.get_base_model()
        # What FSDP wraps as one unit each (accelerate reads it from the root).
        self._no_split_modules = list(getattr(base, "_no_split_modules", None) or [])

    def forward(self, input_ids, attention_mask, position_ids=None, *, generate: dict | None = None,
                logits_to_keep: int = 0):
        """Float logits; or, with `generate`, the policy's `generate(**generate)`."""
        if generate is not None:
            return self.policy.generate(input_ids=input_ids, attention_mask=attention_mask, **generate)
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False, logits_to_keep=logits_to_keep)
        # A copy, not a view: FSDP's hooks on a module's outputs do not follow views.
        return out.logits.float().clone()


class GenerateThroughRoot:
    """What `online_rl.sampling.sample` needs of a model, for a sharded
    `PolicyRoot`: every `generate` call goes through the root's forward."""

    def __init__(self, root):
        self.root = root

    @property
    def training(self) -> bool:
        return self.root.training

    def eval(self):
        self.root.eval()

    def train(self, mode: bool = True):
        self.root.train(mode)

    def generate(self, input_ids, attention_mask, **kwargs):
        return self.root(input_ids, attention_mask, generate=kwargs)


def training_engine(environ=None) -> str:
    """The engine `accelerate launch` set up for this process: "fsdp2" or
    "ddp" (also for one process). Raises ValueError for the engines retrains
    do not run on: DeepSpeed, FSDP version 1 (the rollouts and the gathering
    of the adapter are written for FSDP2's per-parameter sharding, and only
    that is tested), and FSDP with its parameters offloaded to the CPU (the
    shards would sit where a GPU collective cannot gather them)."""
    environ = os.environ if environ is None else environ

    def flag(name):
        return environ.get(name, "false").lower() in ("1", "true", "yes")

    if flag("ACCELERATE_USE_DEEPSPEED"):
        raise ValueError("retrains do not run under DeepSpeed: use an accelerate config with "
                         "distributed_type: FSDP and fsdp_version: 2 (docs/deploy.md), or plain DDP")
    if flag("ACCELERATE_USE_FSDP"):
        version = environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise ValueError(f"retrains under FSDP need fsdp_version: 2 in the accelerate config "
                             f"(this one asks for version {version})")
        if flag("FSDP_OFFLOAD_PARAMS"):
            raise ValueError("retrains under FSDP do not offload parameters to the CPU: set "
                             "fsdp_offload_params: false in the accelerate config")
        return "fsdp2"
    return "ddp"


def training_accelerator():
    """accelerate's `Accelerator` for a retrain, from the launcher's settings
    (`training_engine`).

    An FSDP config is honoured on CPU processes too: accelerate enables FSDP
    only on accelerators and would fall back to DDP, while torch's FSDP2 runs
    over gloo as well (this is how the sharded path is tested on a machine
    without GPUs).
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    engine = training_engine()
    accelerator = Accelerator()
    state = accelerator.state
    if engine == "fsdp2" and state.distributed_type == DistributedType.MULTI_CPU:
        state.fsdp_plugin = FullyShardedDataParallelPlugin()
        state.distributed_type = DistributedType.FSDP
        # As accelerate does on GPUs: every later state object reads it from here.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return accelerator


def prepare(accelerator, policy, optimizer_for):
    """The policy wrapped in a `PolicyRoot`, prepared by `accelerator` with the
    optimizer `optimizer_for(trainable parameters)` makes. Returns (root,
    optimizer, sharded)."""
    from accelerate.utils import DistributedType

    root = PolicyRoot(policy)
    optimizer = optimizer_for([p for p in root.parameters() if p.requires_grad])
    root, optimizer = accelerator.prepare(root, optimizer)
    sharded = accelerator.distributed_type == DistributedType.FSDP
    if sharded:
        # accelerate keeps the root unit (here the embeddings, the final norm,
        # lm_head) whole between forward and backward; a rollout is a long
        # run of forwards, so reshard it too.
        root.set_reshard_after_forward(True)
    return root, optimizer, sharded


def gather_adapter(unwrapped_root: PolicyRoot) -> dict:
    """The policy's trained LoRA weights, whole, on the CPU, keyed as in the
    policy's own state dict (what `save_pretrained(state_dict=...)` takes).
    Under FSDP each is gathered from its shards: every process must call
    this."""
    prefix = "policy."
    weights = {}
    for name, param in unwrapped_root.named_parameters():
        if not (param.requires_grad and name.startswith(prefix)):
            continue  # frozen base weights
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        weights[name[len(prefix):]] = full.detach().to("cpu", copy=True)
    return weights


def process_group(device: str = "auto"):
    """The `accelerate` state when launched as several processes
    (``accelerate launch``), else None.

    On the CPU the processes join a gloo group: accelerate does that only when
    told the run is on the CPU (its ``--cpu`` flag starts a single process,
    so CPU processes are started by the torchrun launcher, ``--multi_gpu``)."""
    import datetime

    import torch
    from accelerate import PartialState

    # The other processes wait in a collective while the main process trains
    # the reward models alone (many minutes for a large base): NCCL's default
    # 10-minute timeout would end them, so allow a whole retrain.
    state = PartialState(cpu=device.startswith("cpu") or not torch.cuda.is_available(),
                         timeout=datetime.timedelta(hours=6))
    return state if state.num_processes > 1 else None


def broadcast(value):
    """`value` from the main process, on every process."""
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def check_engine(quantize: str) -> str:
    """`training_engine`, and a quantized base refused under FSDP: its 8-bit
    weights cannot be sharded and its 4-bit ones are left whole by
    accelerate, so the run would not fit where the plan says it does."""
    engine = training_engine()
    if engine == "fsdp2" and quantize != "none":
        raise ValueError(f"--quantize {quantize} does not combine with FSDP retrains: shard the base "
                         "unquantized, or train quantized without FSDP (DDP or one process)")
    if engine == "fsdp2":
        # Every process needs whole weights for its reward model (and the base
        # is whole on each device before FSDP shards it), so each one reads
        # them itself; with accelerate's "CPU RAM efficient loading"
        # transformers would give all but the first process empty (meta)
        # weights.
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    return engine


def gather_sharded_adapter(trainer, main: bool):
    """After PPO under FSDP: the trained adapter, saved whole into a temporary
    directory by the main process (None on the others). Every process must
    call it (the LoRA weights are gathered from their shards).

    The sharded model cannot be evaluated or saved by the main process alone
    (every forward pass is a collective), so the main process then loads the
    base again, whole, with this adapter (`reload_with_adapter`), as serving
    will. That needs one whole copy of the base per GPU for inference, which
    serving needs anyway; sharding is what saves the training memory (the
    policy's weights, gradients and optimizer state, and the rollouts' KV
    cache, each process holding a share)."""
    import tempfile

    weights = trainer.gather_adapter()
    scratch = tempfile.TemporaryDirectory(prefix="chatbot-gathered-") if main else None
    if main:
        trainer.unwrapped.policy.save_pretrained(scratch.name, state_dict=weights)
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.free_memory()  # drops accelerate's references to the sharded model
    return scratch


def reload_with_adapter(adapter_dir: str, model_name: str, data_dir, device: str, quantize: str):
    """The base loaded whole again, with the adapter in `adapter_dir`."""
    import gc

    import torch
    from peft import PeftModel

    from chatbot.models import load_model

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    base = load_model(model_name, data_dir, device=device, quantize=quantize)
    return PeftModel.from_pretrained(base.model, adapter_dir)
