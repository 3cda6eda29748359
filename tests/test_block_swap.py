"""--blocks_to_swap (training/block_swap.py): swapped blocks train bitwise what resident blocks train (forward,
backward, gradient checkpointing's recomputation, no-grad evaluation; and the trainer end to end), the CUDA path's
streams, events, pinned memory and devices through the CUDA layer (tests/cuda_semantics.py), the memory estimate's
view of the swap, and `auto`."""

import contextlib

import pytest
import torch
from conftest import ASSETS, lora_argv, lora_weights, run_trainer
from cuda_semantics import cuda_streams_on_cpu, fake_cuda
from torch.utils._python_dispatch import TorchDispatchMode

from training import block_swap
from training.models import prepare_frozen_base
from training.modes import LoRA
from training.sections import LoraFlags, TrainingFlags
from training.step import selective_checkpointing


TARGETS = "to_q,to_k,to_v,to_out.0,ff.net.2"  # LoRA layers in the attention and the feed-forward of every block


def _tiny_lora_transformer(layers=4, checkpointing="none", seed=1, quantize_base="none"):
    """A tiny CogVideoX-2b-shaped transformer of `layers` blocks with LoRA layers (lora_B drawn, so that every
    gradient is non-zero), checkpointing none, all, or half of its blocks, its base stored as `quantize_base`."""
    from diffusers import CogVideoXTransformer3DModel

    from tools.build_tiny_model import build_pipeline

    config = dict(build_pipeline("2b").transformer.config, num_layers=layers)
    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel.from_config(config)
    prepare_frozen_base(transformer, quantize_base, torch.float32)
    LoRA().prepare(transformer, TrainingFlags(seed=3), LoraFlags(rank=4, lora_alpha=4, lora_target_modules=TARGETS))
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in transformer.named_parameters():
        if "lora_B" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.1
    if checkpointing == "all":
        transformer.enable_gradient_checkpointing()
    elif checkpointing == "half":
        transformer.enable_gradient_checkpointing(selective_checkpointing(transformer.transformer_blocks, 0.5))
    return transformer


def _inputs(transformer, device="cpu"):
    config = transformer.config
    generator = torch.Generator().manual_seed(5)
    return dict(hidden_states=torch.randn(2, 3, config.in_channels, 8, 8, generator=generator).to(device),
                encoder_hidden_states=torch.randn(2, config.max_text_seq_length, config.text_embed_dim,
                                                  generator=generator).to(device),
                timestep=torch.tensor([10, 500]).to(device), return_dict=False)


def _train_and_evaluate(transformer):
    """(LoRA gradients of a forward and backward, the training output, a no-grad output)."""
    inputs = _inputs(transformer)
    out = transformer(**inputs)[0]
    out.square().mean().backward()
    with torch.no_grad():
        evaluated = transformer(**inputs)[0]
    return [p.grad for p in transformer.parameters() if p.requires_grad], out.detach(), evaluated


@pytest.mark.parametrize("checkpointing, count, quantize_base", [("none", 2, "none"), ("all", 4, "none"),
                                                                  ("half", 3, "none"), ("all", 3, "fp8")])
def test_swapped_blocks_compute_bitwise_what_resident_blocks_compute(checkpointing, count, quantize_base):
    """Forward, backward (with gradient checkpointing's recomputation of all or half the blocks) and a no-grad
    forward give the same bits with `count` of 4 blocks swapped (CPU: the copies are CPU-to-CPU), an FP8-stored base
    too (its weights swap in FP8); each training micro-batch copies each swapped block in once forward and once
    backward, but the highest (kept between them)."""
    plain = _train_and_evaluate(_tiny_lora_transformer(checkpointing=checkpointing, quantize_base=quantize_base))
    transformer = _tiny_lora_transformer(checkpointing=checkpointing, quantize_base=quantize_base)
    swap = block_swap.install(transformer, count, "cpu")
    lora = {name: p.data_ptr() for name, p in transformer.named_parameters() if "lora_" in name}
    assert len(swap.swapped) == count and all(swap.weights[i] for i in swap.swapped)
    lora_ids = {id(p) for name, p in transformer.named_parameters() if "lora_" in name}
    assert not {id(m._parameters[n]) for i in swap.swapped for m, n in swap.weights[i]} & lora_ids
    inputs = _inputs(transformer)
    out = transformer(**inputs)[0]
    out.square().mean().backward()
    assert swap.copies == block_swap.copies_per_micro_batch(count) and not swap.resident
    with torch.no_grad():
        evaluated = transformer(**inputs)[0]
    swapped = [p.grad for p in transformer.parameters() if p.requires_grad], out.detach(), evaluated
    assert all(torch.equal(a, b) for a, b in zip(plain[0], swapped[0]))
    assert torch.equal(plain[1], swapped[1]) and torch.equal(plain[2], swapped[2])
    assert swap.most_resident <= 2
    assert {name: p.data_ptr() for name, p in transformer.named_parameters() if "lora_" in name} == lora
    if quantize_base == "fp8":
        assert torch.float8_e4m3fn in {home.dtype for i in swap.swapped for home in swap.homes[i]}


class _Streams:
    """CUDA's stream API over the CPU, recording: which stream is current, what each event marks, what waits."""

    def __init__(self):
        self.compute = self.Stream(self, "compute")
        self.current = [self.compute]
        self.waited = set()  # events the compute stream has waited on
        self.pending = []  # copies issued on a stream whose event is not recorded yet: [(pointer, stream)]
        self.event_of = {}  # pointer of a device copy -> the event recorded after it
        self.recorded_streams = {}  # pointer -> streams record_stream was given

    class Stream:
        def __init__(self, log, name="side"):
            self.log, self.name = log, name

        def wait_event(self, event):
            self.log.waited.add(event) if self is self.log.compute else None

        def wait_stream(self, other):
            pass

    def patch(self, monkeypatch):
        log = self

        class Event:
            def record(self, stream=None):
                for pointer, on in log.pending:
                    assert on is stream, "an event recorded on another stream than its copies"
                    log.event_of[pointer] = self
                log.pending.clear()

        @contextlib.contextmanager
        def stream(s):
            log.current.append(s)
            try:
                yield
            finally:
                log.current.pop()

        monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: self.Stream(log), raising=False)
        monkeypatch.setattr(torch.cuda, "Event", Event, raising=False)
        monkeypatch.setattr(torch.cuda, "stream", stream, raising=False)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: log.current[-1], raising=False)
        monkeypatch.setattr(torch.Tensor, "record_stream",
                            lambda t, s: log.recorded_streams.setdefault(t.data_ptr(), []).append(s))


class _SwapRules(TorchDispatchMode):
    """At every operator: a copy out of a swapped weight's host copy is issued on the side stream into a fresh device
    copy; any other operator reads no host copy (the compute runs on device copies only), reads a device copy only
    after the compute stream waited on its event, and finds at most `most` swapped blocks resident."""

    def __init__(self, swap, streams, most=2):
        super().__init__()
        self.swap, self.streams, self.most = swap, streams, most
        self.homes = {h.data_ptr() for homes in swap.homes.values() for h in homes}
        self.copies = set()
        self.uses = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        pointers = {a.data_ptr() for a in args if isinstance(a, torch.Tensor) and a.numel()}
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and pointers & self.homes:  # Tensor.to(device, copy=True)
            assert self.streams.current[-1] is self.swap.transfers.stream, "a block copied on the compute stream"
            assert out.data_ptr() not in self.homes and kwargs.get("non_blocking")
            self.streams.pending.append((out.data_ptr(), self.streams.current[-1]))
            self.copies.add(out.data_ptr())
        else:
            assert not pointers & self.homes, f"{func} computed with a swapped weight's host copy"
            for pointer in pointers & self.copies:
                assert self.streams.event_of[pointer] in self.streams.waited, f"{func} read a copy not waited on"
                assert self.streams.compute in self.streams.recorded_streams[pointer]
                self.uses += 1
        assert len(self.swap.resident) <= self.most
        return out


@pytest.mark.parametrize("checkpointing", ["all", "none"])
def test_the_cuda_path_copies_on_a_side_stream_from_pinned_memory_and_waits_before_use(monkeypatch, checkpointing):
    """CudaTransfers over real CPU tensors, CUDA's streams, events and pinning stubbed and recorded: the host copies
    are pinned, each block is copied on the side stream, the compute stream waits on its event (and record_stream
    keeps the memory from the allocator) before any operator reads it, forward, recomputation and backward; no
    operator computes with a host copy; at most 2 swapped blocks are resident; the LoRA weights never move; and the
    gradients are those of a run without the swap."""
    expected = _train_and_evaluate(_tiny_lora_transformer(checkpointing=checkpointing))
    pinned = cuda_streams_on_cpu(monkeypatch)
    streams = _Streams()
    streams.patch(monkeypatch)
    transformer = _tiny_lora_transformer(checkpointing=checkpointing)
    lora = {name: (p, p.data_ptr()) for name, p in transformer.named_parameters() if "lora_" in name}
    swap = block_swap.BlockSwap(transformer.transformer_blocks, 3, block_swap.CudaTransfers(torch.device("cpu")))
    assert all(h.is_pinned() for homes in swap.homes.values() for h in homes) and pinned
    with _SwapRules(swap, streams) as rules:
        got = _train_and_evaluate(transformer)
    assert rules.uses and len(rules.copies) >= 3 and swap.most_resident == 2
    assert all(torch.equal(a, b) for a, b in zip(expected[0], got[0])) and torch.equal(expected[2], got[2])
    assert all(p.data_ptr() == pointer and p.device.type == "cpu" for p, pointer in lora.values())
    assert not {pointer for _, pointer in lora.values()} & rules.copies


def test_on_a_gpu_the_swapped_weights_stay_on_the_host_and_come_to_the_gpu_to_run():
    """Fake CUDA tensors (device rules enforced): `install` picks the CUDA transfers for a CUDA device, the model's
    .to("cuda") leaves the swapped weights on the (pinned) host and moves everything else, LoRA layers included;
    while a swapped block runs its weights are on the GPU (a CPU weight would fail the CUDA matmul), afterwards they
    are back on the host."""
    seen = []

    def check(module, args):
        seen.append((module.base_layer.weight.device.type,
                     {p.device.type for n, p in module.named_parameters() if "lora_" in n}))

    with fake_cuda(torch.bfloat16, loading=True):
        transformer = _tiny_lora_transformer(layers=3)  # fake CPU weights, as loaded by from_pretrained
        for block in transformer.transformer_blocks:
            block.attn1.to_q.register_forward_pre_hook(check)  # peft's LoRA layer around the frozen linear
        swap = block_swap.install(transformer, 2, "cuda")
        transformer.to("cuda")
        assert isinstance(swap.transfers, block_swap.CudaTransfers)
        host = {id(p) for i in swap.swapped for m, n in swap.weights[i] for p in [m._parameters[n]]}
        for name, parameter in transformer.named_parameters():
            assert parameter.device.type == ("cpu" if id(parameter) in host else "cuda"), name
        out = transformer(**_inputs(transformer, "cuda"))[0]
        assert out.device.type == "cuda"
        assert all(p.device.type == "cpu" for p in block_swap.of(transformer).on_host()) and len(swap.resident) == 1
    assert seen == [("cuda", {"cuda"})] * 3


def test_swapped_blocks_stay_on_the_host_through_validations_model_offload():
    """--enable_model_cpu_offload in validation (accelerate's cpu_offload_with_hook, as diffusers installs it) moves
    the whole transformer to the CPU, then to the GPU for its forward: the swapped weights stay on the host through
    both and come to the GPU per block; afterwards (hooks removed, the model moved back) every weight is where
    training keeps it."""
    from accelerate import cpu_offload_with_hook
    from accelerate.hooks import remove_hook_from_module

    with fake_cuda(torch.bfloat16, loading=True):
        transformer = _tiny_lora_transformer(layers=3)
        swap = block_swap.install(transformer, 2, "cuda")
        transformer.to("cuda")
        host = {id(p) for i in swap.swapped for m, n in swap.weights[i] for p in [m._parameters[n]]}

        def where_training_keeps_them():
            return all(p.device.type == ("cpu" if id(p) in host else "cuda") for p in transformer.parameters())

        assert host and where_training_keeps_them()
        _, hook = cpu_offload_with_hook(transformer, execution_device="cuda")
        assert {p.device.type for p in transformer.parameters()} == {"cpu"}
        out = transformer(**_inputs(transformer, "cuda"))[0]  # the hook moves the model to the GPU first
        assert out.device.type == "cuda" and where_training_keeps_them()
        hook.offload()
        remove_hook_from_module(transformer, recurse=True)
        transformer.to("cuda")
        assert where_training_keeps_them()


def test_the_swapped_blocks_are_spread_and_their_weights_leave_accelerator_memory():
    assert block_swap.swapped_indices(42, 0) == []
    assert block_swap.swapped_indices(42, 2) == [0, 21]
    assert block_swap.swapped_indices(4, 9) == [0, 1, 2, 3]
    transformer = _tiny_lora_transformer(layers=4)
    before = {id(t) for t in block_swap.device_tensors(transformer)}
    swap = block_swap.install(transformer, 2, "cpu")
    after = {id(t) for t in block_swap.device_tensors(transformer)}
    assert before - after == {id(p) for p in swap.on_host()} and len(before - after) == 2 * len(swap.weights[0])


def test_swap_plan_counts_bytes_over_the_assumed_bandwidth():
    plan = block_swap.swap_plan(10, 2 * 10**8, micro_batches_per_step=2, inference_steps=50)
    assert plan["bytes_moved_per_step"] == (2 * 10 - 1) * 2 * 10**8 * 2
    assert plan["added_seconds_per_step_at_most"] == pytest.approx(plan["bytes_moved_per_step"] / 25e9, abs=1e-3)
    assert plan["bytes_moved_per_validation_video"] == 10 * 2 * 10**8 * 50


# ----------------------------------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def tiny_model_3_blocks(tmp_path_factory):
    from tools.build_tiny_model import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("tiny-3-blocks"), "2b", seed=0, transformer={"num_layers": 3}))


def _run(model, output, *extra):
    return run_trainer(lora_argv(model, ASSETS, output, "--max_train_steps", "2", "--gradient_checkpointing",
                                 "--validation_prompt", "a cat", "--num_inference_steps", "2", "--height", "32",
                                 "--width", "32", "--validation_num_frames", "9", *extra))


def test_the_trainer_with_blocks_swapped_trains_bitwise_what_it_trains_without(tiny_model_3_blocks, tmp_path,
                                                                               monkeypatch):
    """Two steps of the LoRA trainer (gradient checkpointing), validation and the final test, with 2 of the 3 blocks
    swapped and without: the same LoRA bits, and the swapped run's final test (the saved LoRA in a fresh pipeline,
    blocks swapped there too) reproduces its validation videos exactly."""
    plain = _run(tiny_model_3_blocks, tmp_path / "plain")
    installed, install = [], block_swap.install
    monkeypatch.setattr(block_swap, "install", lambda *args: installed.append(install(*args)) or installed[-1])
    swapped = _run(tiny_model_3_blocks, tmp_path / "swapped", "--blocks_to_swap", "2")
    assert len(installed) == 2  # the trained transformer, and the final test's
    assert all(swap.swapped == [0, 1] and swap.copies for swap in installed)
    a, b = lora_weights(tmp_path / "plain"), lora_weights(tmp_path / "swapped")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert swapped["final_loss"] == plain["final_loss"] and swapped["parity"]["exact"]


def _errors(capsys, argv, main=None):
    with pytest.raises(SystemExit) as exit_info:
        run_trainer(argv, main)
    assert exit_info.value.code == 2
    return [line for line in capsys.readouterr().err.strip().splitlines() if "blocks_to_swap" in line]


def test_what_block_swap_refuses_before_anything_loads(capsys, tiny_model_2b, tmp_path):
    from conftest import trainer_main

    argv = lora_argv(tiny_model_2b, ASSETS, tmp_path / "run")
    sft = trainer_main("cogvideox_text_to_video_sft")
    assert _errors(capsys, [*argv, "--blocks_to_swap", "2"], sft) == [
        "error: --blocks_to_swap moves frozen weights, and full fine-tuning trains every weight: use a LoRA trainer, or "
        "for full fine-tuning --use_cpu_offload_optimizer / a DeepSpeed config"]
    assert _errors(capsys, [*argv, "--blocks_to_swap", "auto"]) == [
        "error: --blocks_to_swap auto needs --max_memory_gb N: the accelerator memory (GiB) to fit in"]
    lines = _errors(capsys, [*argv, "--blocks_to_swap", "-1", "--quantize_base", "nf4"])
    assert [line.split(":")[1].strip() for line in lines] == ["--blocks_to_swap must be 0 or more, or auto (got -1)",
                                                              "--blocks_to_swap with --quantize_base nf4"]
    assert _errors(capsys, [*argv, "--blocks_to_swap", "auto", "--max_memory_gb", "8", "--train_batch_size",
                            "auto"]) == ["error: a batch size of auto with --blocks_to_swap auto: choose one of them "
                                         "by the estimate, give the other"]


def test_the_run_config_takes_a_count_or_auto(tmp_path):
    from conftest import tiny_run_config

    from training.args import build_parser, parse_args
    from training.run_config import write_trainer_config

    for value, parsed in (('"auto"', "auto"), ("3", 3)):
        path = tiny_run_config(tmp_path / "config.toml", "model", tmp_path / "run")
        path.write_text(path.read_text() + f"[memory]\nblocks_to_swap = {value}\nmax_memory_gb = 12\n")
        args = parse_args(["--config", str(path)])
        assert args.blocks_to_swap == parsed
        write_trainer_config(args, build_parser(), tmp_path / "written.toml")  # as a run saves its config.toml
        assert parse_args(["--config", str(tmp_path / "written.toml")]).blocks_to_swap == parsed


# ----------------------------------------------------------------------------------------------- the estimate
def _estimate_training(count, checkpointing=True):
    """estimate_training's bytes for a model whose weights are a large part of its memory (4 blocks, small clips)."""
    from test_memory_estimate import _mid_size_config

    from training.args import parse_args
    from training.conditioning import TextToVideo
    from training.memory_estimate import estimate_training
    from training.modes import MODES
    from training.sections import run_flags

    flags = run_flags(parse_args(["--pretrained_model_name_or_path", "-", "--load_tensors", "--train_batch_size", "1",
                                  "--mixed_precision", "bf16", "--optimizer", "adamw", "--blocks_to_swap", str(count),
                                  *(["--gradient_checkpointing"] if checkpointing else [])]))
    config = dict(_mid_size_config(), num_attention_heads=8, attention_head_dim=64)
    vae_config = {"block_out_channels": [8, 8, 8, 8], "scaling_factor": 0.7, "temporal_compression_ratio": 4}
    f = flags
    estimate = estimate_training(f.data, f.training, f.optimizer, f.lora, f.validation, f.memory, f.parallelism,
                                 config, vae_config, None, TextToVideo(), MODES["lora"](), torch.bfloat16,
                                 (9, 64, 64), "cuda")
    block = block_swap.frozen_block_bytes(config, MODES["lora"](), f.training, f.lora, f.memory, torch.bfloat16)
    return estimate, block


def test_the_estimate_takes_the_swapped_weights_off_and_counts_the_blocks_in_flight():
    """With 3 of 4 blocks swapped, the weights that stay (static) are 3 blocks' frozen weights lighter, exactly; the
    training peak about that less 2 blocks (the one at work and the one coming)."""
    plain, block = _estimate_training(0)
    swapped, _ = _estimate_training(3)
    assert plain["static"] - swapped["static"] == pytest.approx(3 * block, rel=0.01)
    saved = plain["training_peak"] - swapped["training_peak"]
    assert 1 * block * 0.99 <= saved <= 3 * block * 1.01, (saved / block)


def test_the_validation_estimate_counts_only_the_resident_blocks_offloaded_or_not():
    """Validation (the training transformer generating, VAE and T5 beside it; with --enable_model_cpu_offload each
    on the GPU only while it works): 3 of 4 blocks swapped take about 3 blocks' weights less off the peak, less the
    blocks at work and coming."""
    from test_memory_estimate import PIPELINE_VAE, SMALL_T5, _validation_config
    from transformers import T5Config

    from training.args import parse_args
    from training.conditioning import TextToVideo
    from training.memory_estimate import estimate_phases
    from training.modes import MODES
    from training.sections import run_flags

    config = dict(_validation_config(), num_layers=4, num_attention_heads=8, attention_head_dim=64)
    bucket = (9, 64, 64)

    def validation_peak(*flags):
        f = run_flags(parse_args(["--pretrained_model_name_or_path", "-", "--load_tensors", "--train_batch_size", "1",
                                  "--mixed_precision", "bf16", "--validation_prompt", "a cat", "--height", "64",
                                  "--width", "64", "--validation_num_frames", "9", *flags]))
        return estimate_phases(f.data, f.buckets, f.training, f.optimizer, f.lora, f.validation, f.memory,
                               f.parallelism, config, PIPELINE_VAE, T5Config(**SMALL_T5), TextToVideo(),
                               MODES["lora"](), torch.bfloat16, {bucket: 1}, known_peaks={(bucket, 1): 0})["validation"]

    f = run_flags(parse_args(["--pretrained_model_name_or_path", "-"]))
    block = block_swap.frozen_block_bytes(config, MODES["lora"](), f.training, f.lora, f.memory, torch.bfloat16)
    for offload in ([], ["--enable_model_cpu_offload"]):
        saved = validation_peak(*offload) - validation_peak(*offload, "--blocks_to_swap", "3")
        assert 0.99 * block <= saved <= 3 * block * 1.01, (offload, saved / block)


def test_auto_takes_the_smallest_count_that_fits():
    from training.batch_size import smallest_count_under

    peaks = {n: 100 - 7 * n for n in range(11)}  # 7 saved per block
    calls = []

    def peak_of(n):
        calls.append(n)
        return peaks[n]

    for limit, saved_guess in ((60, 7), (60, 2), (60, 30), (99, 1), (100, 5), (30, 7)):
        calls.clear()
        count, simulated = smallest_count_under(limit, peak_of, 10, saved_guess)
        smallest = min(n for n in peaks if peaks[n] <= limit)
        assert count == smallest and simulated[count] <= limit
        assert count == 0 or simulated[count - 1] > limit  # the count below was simulated and does not fit
        assert len(calls) == len(set(calls))
    assert smallest_count_under(29, peak_of, 10, 7)[0] is None
    assert len(calls) <= 6  # the guess lands near: a few simulations, not one per count


def test_dry_run_prints_the_count_auto_chose_and_the_bytes_it_moves(capsys, tiny_model_3_blocks, tmp_path, monkeypatch):
    """--blocks_to_swap auto in a --dry_run, the estimate stood in for by one that falls 1 GiB per swapped block (the
    real estimate's view of the swap: the test above): the trainer runs with the smallest count that fits, the plan
    is estimated with it, and states the bytes moved per step and the time they take at an assumed bandwidth."""
    from training import memory_estimate

    simulated = []

    def estimate_phases(data, buckets, training, optimizer, lora, validation, memory, *args, **kwargs):
        peak = (10 - memory.blocks_to_swap) * 2**30
        simulated.append(memory.blocks_to_swap)
        names = ["x".join(map(str, bucket)) for bucket in args[7]]
        return {"bucket": names[0], "batch_size": 1, "training": peak, "validation": peak - 1, "final_test": peak - 2,
                "training_per_bucket": dict.fromkeys(names, peak)}

    monkeypatch.setattr(memory_estimate, "estimate_phases", estimate_phases)
    plan = run_trainer(lora_argv(tiny_model_3_blocks, ASSETS, tmp_path / "auto", "--validation_prompt", "a cat",
                                 "--gradient_accumulation_steps", "2", "--blocks_to_swap", "auto", "--max_memory_gb",
                                 "8.5", "--dry_run"))["dry_run"]
    swap = plan["block_swap"]
    assert swap["blocks_to_swap"] == 2 and {1, 2} <= set(simulated[:-1]) and simulated[-1] == 2
    assert plan["peak_memory_bytes"]["training"] == 8 * 2**30
    assert swap["bytes_moved_per_step"] == (2 * 2 - 1) * swap["bytes_per_swapped_block"] * 2  # 2 micro-batches
    assert swap["estimated_peak_gib_by_count"][1] == 9 and swap["estimated_peak_gib_by_count"][2] == 8
    out = capsys.readouterr().out
    assert "blocks_to_swap: 2 of 3 transformer blocks (auto" in out and "ASSUMED 25 GB/s" in out
