"""The accelerate configs under configs/ load and resolve to the launch they document, through accelerate's code."""

import re
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, patch_environment
from accelerate.utils.launch import prepare_multi_gpu_env
from conftest import ROOT

from encoder_duplex import UpdateEncoderLayer

CONFIGS = {
    "ddp.yaml": DistributedType.MULTI_GPU,
    "fsdp_1.7b.yaml": DistributedType.FSDP,
    "deepspeed_zero2.yaml": DistributedType.DEEPSPEED,
}


def launch_args(name: str):
    argv = ["--config_file", str(ROOT / "configs" / name), "--num_processes", "2", "train_duplex.py", "--bf16"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    return args


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_loads_and_validates(name):
    config = load_config_from_file(str(ROOT / "configs" / name))
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type == CONFIGS[name] and config.mixed_precision == "bf16"
    args = launch_args(name)
    assert (args.multi_gpu, args.use_fsdp, args.use_deepspeed) == (
        name == "ddp.yaml",
        name == "fsdp_1.7b.yaml",
        name == "deepspeed_zero2.yaml",
    )
    assert args.num_processes == 2 and args.mixed_precision == "bf16"


def test_fsdp_config_builds_accelerates_plugin():
    env = prepare_multi_gpu_env(launch_args("fsdp_1.7b.yaml"))
    with patch_environment(**env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)
    assert plugin.transformer_cls_names_to_wrap == ["Qwen3MLP", UpdateEncoderLayer.__name__]


def test_readme_gives_the_launch_command_of_every_config():
    readme = (ROOT / "README.md").read_text()
    for name in CONFIGS:
        assert re.search(rf"accelerate launch --config_file configs/{re.escape(name)} ", readme), name
    assert Path(ROOT / "scripts" / "memory_estimate.py").exists()
