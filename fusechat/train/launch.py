"""Start `fusechat sft`/`fusechat dpo` on several processes or machines.

    python -m fusechat.train.launch sft RECIPE                     # one process (as `fusechat sft`)
    python -m fusechat.train.launch sft RECIPE --nproc 2           # data parallel, torchrun (CPU or GPU)
    python -m fusechat.train.launch dpo RECIPE --nproc 8 --config fsdp
    python -m fusechat.train.launch sft RECIPE --nproc 8 --config zero3 \
        --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500   # on each machine

Every rank runs `python -m fusechat.train.<stage>`, the same `run_sft`/`run_dpo` as the CLI.
Without `--config` the launcher is torchrun: `accelerate launch --cpu --num_processes 2` silently
starts ONE process, while torchrun really starts N (gloo on CPU, NCCL on GPU). With `--config`
(ddp, fsdp, zero3 under `fusechat/train/configs/`, or any accelerate YAML file) it is
`accelerate launch`. `--print` shows the command instead of running it. A config that needs a
package this machine lacks (DeepSpeed for zero3) stops here with one line and exit status 2, before
any process starts.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import subprocess
import sys
from pathlib import Path

CONFIGS = Path(__file__).parent / "configs"
STAGES = ("sft", "dpo")
# accelerate's distributed_type -> the module it imports on every rank, and where it comes from
NEEDS = {"DEEPSPEED": ("deepspeed", "DeepSpeed", "pip install deepspeed; pinned in requirements/gpu.lock")}


class LaunchError(SystemExit):
    """A bad launch setting: `main` prints the message as one line and exits with status 2."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def config_file(name: str) -> Path:
    path = CONFIGS / f"{name}.yaml" if (CONFIGS / f"{name}.yaml").exists() else Path(name)
    if not path.is_file():
        known = ", ".join(p.stem for p in sorted(CONFIGS.glob("*.yaml")))
        raise LaunchError(f"--config {name}: neither a shipped config ({known}) nor an existing file")
    _check_installed(name, path)
    return path


def _check_installed(name: str, path: Path) -> None:
    # accelerate would fail on every rank with a traceback each; one line before launching is clearer
    import yaml

    try:
        kind = (yaml.safe_load(path.read_text()) or {}).get("distributed_type")
    except (OSError, yaml.YAMLError, AttributeError) as e:
        raise LaunchError(f"--config {name}: {path} is not an accelerate YAML config ({e})") from None
    module, label, how = NEEDS.get(str(kind), (None, None, None))
    if module and importlib.util.find_spec(module) is None:
        raise LaunchError(f"--config {name}: distributed_type {kind} needs {label}, which is not installed ({how})")


def build_command(
    stage: str,
    recipe: str,
    *,
    nproc: int = 1,
    config: str | None = None,
    run_dir: str | None = None,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int = 29500,
) -> list[str]:
    """The command line that starts `stage` on `nproc` processes per machine, `nnodes` machines."""
    if stage not in STAGES:
        raise LaunchError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    if nproc < 1 or nnodes < 1:
        raise LaunchError("--nproc and --nnodes must be >= 1")
    target = [f"fusechat.train.{stage}", recipe] + (["--run-dir", run_dir] if run_dir else [])
    py = sys.executable
    if config is not None:
        return [
            py, "-m", "accelerate.commands.launch", "--config_file", str(config_file(config)),
            "--num_processes", str(nproc * nnodes), "--num_machines", str(nnodes),
            "--machine_rank", str(node_rank), "--main_process_ip", master_addr,
            "--main_process_port", str(master_port), "--module", *target,
        ]
    if nproc == 1 and nnodes == 1:
        return [py, "-m", *target]
    if nnodes == 1:
        rdzv = ["--standalone"]
    else:
        rdzv = ["--nnodes", str(nnodes), "--node_rank", str(node_rank),
                "--master_addr", master_addr, "--master_port", str(master_port)]
    return [py, "-m", "torch.distributed.run", *rdzv, "--nproc_per_node", str(nproc), "-m", *target]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fusechat.train.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=STAGES)
    p.add_argument("recipe")
    p.add_argument("--run-dir")
    p.add_argument("--nproc", type=int, default=1, help="processes per machine (one per GPU)")
    p.add_argument("--config", help="accelerate config: ddp, fsdp, zero3 or a YAML file")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--print", action="store_true", help="print the command, do not run it")
    a = p.parse_args(argv)
    try:
        cmd = build_command(
            a.stage, a.recipe, nproc=a.nproc, config=a.config, run_dir=a.run_dir, nnodes=a.nnodes,
            node_rank=a.node_rank, master_addr=a.master_addr, master_port=a.master_port,
        )
    except LaunchError as e:
        print(e.message, file=sys.stderr)
        return 2
    if a.print:
        print(shlex.join(cmd))
        return 0
    print(f"+ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
