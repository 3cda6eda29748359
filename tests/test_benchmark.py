"""benchmarks/benchmark_training.py at --scale tiny on the CPU: rows, activation measure, FLOP formula, tables."""

import json

import pytest
import torch
from conftest import reset_accelerate

from benchmarks import benchmark_training as bench


pytestmark = pytest.mark.slow  # the benchmark's own processes and runs


TINY = ["--scale", "tiny", "--steps", "2", "--warmup_steps", "1"]
ROW_FIELDS = [
    "name", "model", "mode", "rank", "batch", "resolution", "frames", "flags", "device", "versions", "parameters",
    *bench.PHASES, "activation_bytes", "weight_copy_bytes", "s_per_step", "outside_transformer_share",
    "model_flops_per_step", "achieved_tflops", "mfu", "command",
]


def run_row(own, trainer, output):
    """One configuration through the command line's own path (main, in this process); returns the row it wrote."""
    reset_accelerate()
    try:
        bench.main([*TINY, *own, "--output", str(output), "--", *trainer])
    finally:
        reset_accelerate()
    return json.loads(output.read_text().splitlines()[-1])


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    output = tmp_path_factory.mktemp("benchmark") / "rows.jsonl"
    lora = ["--rank", "4", "--lora_alpha", "4"]
    return {
        "lora": run_row(["--model", "2b", "--mode", "lora"], lora, output),
        "lora_gc": run_row(["--model", "2b", "--mode", "lora"], [*lora, "--gradient_checkpointing"], output),
        # --peak_tflops gives the CPU an MFU, to check the arithmetic that GPUs use.
        "sft": run_row(["--model", "2b", "--mode", "sft", "--peak_tflops", "0.5"], ["--optimizer", "adamw"], output),
        "output": output,
    }


PEAK = "max_memory_allocated" if torch.cuda.is_available() else "peak_rss"  # what each phase reports on this machine


def test_lora_and_full_rows_have_every_field(rows):
    for key in ("lora", "lora_gc", "sft"):
        row = rows[key]
        assert row["status"] == "ok", row.get("error")
        missing = [field for field in ROW_FIELDS if field not in row]
        assert not missing, f"{key}: {missing}"
        assert row["device"] == bench.device_name()  # the GPU's name on a GPU machine, else "cpu (...)"
        for phase in bench.PHASES:
            assert row[phase][PEAK] > 0
        assert row["s_per_step"] > 0 and len(row["step_seconds"]) == 2
        assert 0 < row["outside_transformer_share"] < 1
        assert row["transformer_forward_s"] > 0 and row["transformer_backward_s"] > 0
        assert row["frames"] == 9 and row["resolution"] == "64x64" and row["latent_grid"] == [3, 8, 8]
    assert rows["lora"]["rank"] == 4 and rows["sft"]["rank"] is None
    if not torch.cuda.is_available():
        assert rows["lora"]["mfu"] is None  # no known peak on a CPU
    sft = rows["sft"]
    # MFU from FLOPs counted by torch (not the benchmark's formula) for the row's own step: the full fine-tune's
    # forward and backward at its batch and latent grid.
    counted = _counted_training_flops(sft["batch"], sft["latent_grid"])
    assert sft["model_flops_per_step"] == pytest.approx(counted, rel=0.02)
    assert sft["mfu"] == pytest.approx(counted / sft["s_per_step"] / 0.5e12, rel=0.02)
    written = [json.loads(line) for line in rows["output"].read_text().splitlines()]
    assert [r["name"] for r in written] == [rows[k]["name"] for k in ("lora", "lora_gc", "sft")]


def test_lora_trains_fewer_parameters_than_full(rows):
    lora, full = rows["lora"]["parameters"], rows["sft"]["parameters"]
    assert 0 < lora["trainable"] < full["trainable"] == full["total"]
    # Full fine-tuning keeps fp32 master weights under bf16 autocast, so its forward saves bf16 weight copies.
    assert rows["sft"]["weight_copy_bytes"] > rows["lora"]["weight_copy_bytes"]


def test_gradient_checkpointing_saves_fewer_activations(rows):
    assert 0 < rows["lora_gc"]["activation_bytes"] < rows["lora"]["activation_bytes"]


# With 2b above: sincos positions; here rotary + learned positions + the I2V VAE encode, and temporal patches, the
# latter loaded through the trainer's own load_transformer (from weights written to disk).
@pytest.mark.parametrize("model, own", [("5b-i2v", []), ("1.5-5b", ["--through_trainer_loader"])])
def test_other_architectures_run(model, own, tmp_path):
    row = run_row(["--model", model, "--mode", "lora", "--steps", "1", "--scratch_dir", str(tmp_path), *own],
                  ["--rank", "2", "--lora_alpha", "2"], tmp_path / "rows.jsonl")
    assert row["status"] == "ok", row.get("error")
    spec = bench.model_spec(model, "tiny")
    assert row["latent_grid"] == list(bench.latent_grid(*spec.train_video, spec.transformer))


def test_flags_the_trainer_refuses_are_recorded_not_measured(tmp_path):
    row = run_row(["--model", "2b", "--mode", "sft"], ["--optimizer", "adamw", "--use_8bit", "--use_4bit"],
                  tmp_path / "rows.jsonl")
    assert row["status"] == "unsupported" and "--use_4bit" in row["error"]
    assert "memory_before_training" not in row


def test_saved_activation_bytes_counts_each_storage_once_without_weights():
    weight = torch.randn(1000, requires_grad=True)
    exponent = {}

    def forward():
        exponent["value"] = weight.exp()  # exp saves its output; mul saves it again (same storage) and the weight
        return (weight * exponent["value"]).sum()

    measured = bench.saved_activation_bytes(forward, weights=[weight])
    assert measured.activations == exponent["value"].untyped_storage().nbytes()
    assert bench.saved_activation_bytes(forward).activations == 2 * weight.untyped_storage().nbytes()


def _counted_training_flops(batch, grid, model="2b"):
    from diffusers import CogVideoXTransformer3DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from training.models import rotary_embeddings

    config = bench.model_spec(model, "tiny").transformer
    transformer = CogVideoXTransformer3DModel(**config)
    inputs = dict(
        hidden_states=torch.randn(batch, grid[0], config["in_channels"], *grid[1:]),
        encoder_hidden_states=torch.randn(batch, config["max_text_seq_length"], config["text_embed_dim"]),
        timestep=torch.full((batch,), 500), image_rotary_emb=rotary_embeddings(config, *grid, "cpu"), return_dict=False,
    )
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        transformer(**inputs)[0].square().mean().backward()
    return counter.get_total_flops()


def test_peak_figures_are_the_datasheets_dense_bf16():
    """NVIDIA's datasheet dense BF16 tensor-core TFLOPS (without sparsity), which MFU divides by."""
    datasheet = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0,
                 "NVIDIA H200": 989.0, "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100-PCIE-40GB": 312.0,
                 "NVIDIA L40S": 362.0, "NVIDIA GeForce RTX 4090": None}
    assert {name: bench.peak_tflops(name) for name in datasheet} == datasheet


@pytest.mark.parametrize("model", sorted(bench.MODELS))
def test_flop_formula_matches_flop_counter(model):
    from diffusers import CogVideoXTransformer3DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from training.models import rotary_embeddings

    spec = bench.model_spec(model, "tiny")
    config = spec.transformer
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(**config)
    batch = 2
    grid = bench.latent_grid(*spec.train_video, config)
    inputs = dict(
        hidden_states=torch.randn(batch, grid[0], config["in_channels"], *grid[1:]),
        encoder_hidden_states=torch.randn(batch, config["max_text_seq_length"], config["text_embed_dim"]),
        timestep=torch.tensor([10, 500]),
        image_rotary_emb=rotary_embeddings(config, *grid, "cpu"),
        return_dict=False,
    )
    # The math backend runs attention as matmuls the counter sees (the CPU's fused kernel has no FLOP formula).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as forward_counter:
        transformer(**inputs)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as step_counter:
        transformer(**inputs)[0].square().mean().backward()
    predicted = bench.transformer_forward_flops(config, batch, *grid)
    assert predicted["attention"] > 0.1 * predicted["total"]  # the attention term is really exercised
    assert predicted["total"] == pytest.approx(forward_counter.get_total_flops(), rel=0.02)
    assert bench.training_step_flops(predicted, base_weights_train=True) == pytest.approx(
        step_counter.get_total_flops(), rel=0.02
    )


def test_full_size_configs_match_the_published_models():
    from diffusers import CogVideoXTransformer3DModel

    # Parameter counts of the published checkpoints (README: 1.69 B and 5.57 B).
    for model, billions in (("2b", 1.69), ("5b", 5.57), ("5b-i2v", 5.57), ("1.5-5b", 5.57)):
        transformer = bench.build_random(CogVideoXTransformer3DModel, bench.MODELS[model].transformer, torch.bfloat16,
                                         "meta")
        assert sum(p.numel() for p in transformer.parameters()) / 1e9 == pytest.approx(billions, abs=0.01), model


def test_trainer_flags_pass_through():
    options, flags = bench.parse_options(["--model", "5b", "--rank", "8", "--mode", "sft", "--", "--use_8bit"])
    assert (options.model, options.mode) == ("5b", "sft")
    assert flags == ["--rank", "8", "--use_8bit"]


def test_markdown_table_has_the_readme_columns_and_commands(rows, capsys):
    failed = dict(status="crashed", model="5b", mode="sft", scale="tiny", flags=["--optimizer", "adamw"],
                  device=rows["sft"]["device"], command="python benchmarks/benchmark_training.py --model 5b -- --x")
    table = bench.render_markdown([rows["lora"], rows["lora_gc"], rows["sft"], failed])
    header = next(line for line in table.splitlines() if line.startswith("| model | lora rank"))
    for column in ("batch", "gradient_checkpointing", *bench.PHASES, "s/step", "MFU", "command"):
        assert f" {column} |" in header
    for key in ("lora", "lora_gc", "sft"):
        assert f"`{rows[key]['command']}`" in table
    lora_line = next(line for line in table.splitlines() if rows["lora"]["command"] in line)
    assert f"| {rows['lora']['memory_before_training'][PEAK]:.3f} |" in lora_line
    crashed_line = next(line for line in table.splitlines() if failed["command"] in line)
    cells = [cell.strip() for cell in crashed_line.split("|")]
    assert cells.count("crashed") == len(bench.PHASES) + 1  # every memory phase and s/step
    assert bench.main(["--markdown", str(rows["output"])]) == 0  # the command line renders the same tables
    assert rows["sft"]["command"] in capsys.readouterr().out


def test_sweep_records_a_configuration_that_dies(tmp_path, monkeypatch):
    output = tmp_path / "sweep.jsonl"
    # "nonexistent" is not a model the child accepts: it exits at once without writing its row.
    monkeypatch.setitem(bench.SWEEPS, "test", lambda: [("nonexistent", "lora", ["--rank", "4"])])
    options, flags = bench.parse_options(["--sweep", "test", "--output", str(output), *TINY])
    bench.run_sweep(options, flags)
    (row,) = [json.loads(line) for line in output.read_text().splitlines()]
    assert row["status"] == "crashed" and "invalid choice" in row["error"]
    assert row["command"].endswith("-- --rank 4")
    bench.run_sweep(options, flags)  # run again: configurations with a row already are skipped
    assert len(output.read_text().splitlines()) == 1


def test_readme_sweep_covers_the_issue_matrix():
    configurations = bench.SWEEPS["readme"]()
    assert {model for model, _, _ in configurations} == {"2b", "5b", "1.5-5b"}
    lora = [flags for model, mode, flags in configurations if model == "5b" and mode == "lora"]
    assert sorted((f[f.index("--rank") + 1], f[f.index("--train_batch_size") + 1]) for f in lora) == sorted(
        (rank, batch) for rank in ("16", "64", "256") for batch in ("1", "4")
    )
    assert all("--gradient_checkpointing" in flags for _, _, flags in configurations)
    full = [" ".join(flags) for model, mode, flags in configurations if model == "5b" and mode == "sft"]
    for optimizer in ("--master_weight_dtype bf16", "--use_8bit", "--use_torchao --use_8bit",
                      "--use_cpu_offload_optimizer"):
        assert any(optimizer in flags for flags in full), optimizer


def test_levers_sweep_has_a_row_per_lever_that_the_trainer_accepts():
    from training.args import build_parser

    configurations = bench.SWEEPS["levers"]()
    assert {(model, mode) for model, mode, _ in configurations} == {("2b", "lora"), ("5b", "lora"), ("5b", "sft"),
                                                                    ("1.5-5b", "lora")}
    after_base = [flags[flags.index("--gradient_checkpointing") + 1:] for _, _, flags in configurations]
    for lever in bench.LEVERS.values():
        assert after_base.count(lever) == 4, lever  # one row per model and mode
    for _, _, flags in configurations:
        build_parser().parse_args(["--pretrained_model_name_or_path", "-", *flags])


def test_memory_estimate_table_row_has_its_command(capsys):
    from benchmarks import estimate_memory

    estimate_memory.main(["--model", "5b", "--mode", "lora", "--scale", "tiny", "--", "--rank", "4",
                          "--gradient_checkpointing"])
    header, separator, row = capsys.readouterr().out.strip().splitlines()
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[:2] == ["5b", "lora"] and all(float(cells[i]) >= 0 for i in (5, 6, 7))
    assert "benchmarks/estimate_memory.py --model 5b --mode lora -- --rank 4 --gradient_checkpointing" in cells[8]


def test_gpu_slug_needs_a_gpu_and_names_it_as_a_file_name(monkeypatch, capsys):
    """What run_gpu_benchmarks.sh names its results after."""
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA GPU here"):
            bench.main(["--gpu_slug"])
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H100 80GB HBM3")
    assert bench.main(["--gpu_slug"]) == 0
    slug = capsys.readouterr().out.strip()
    assert slug and all(c.isalnum() or c == "-" for c in slug) and not slug.startswith("-")
