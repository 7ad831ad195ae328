"""roberta-pl-plan: the arithmetic users size jobs with."""

import subprocess

import pytest

from roberta_pl.batch_plan import BatchPlanError
from roberta_pl.cli.plan import estimate, main
from roberta_pl.model import RobertaConfig, mlm_flops_per_token


def test_roberta_base_recipe_on_64_gpus():
    e = estimate("base", 512, 8192, 32, nodes=8, gpus_per_node=8)
    assert (e.accumulation, e.world_size, e.tokens_per_step) == (4, 64, 4_194_304)
    assert e.params / 1e6 == pytest.approx(124.7, abs=0.5)
    assert e.state_gib == pytest.approx(16 * e.params / 2**30)  # DDP: fp32 weights, grads, Adam m and v


def test_zero_stages_shrink_state_and_checkpointing_shrinks_activations():
    kw = dict(model="large", seq_len=512, global_batch=8192, micro_batch=32, nodes=4, gpus_per_node=8)
    states = [estimate(zero_stage=z, **kw).state_gib for z in (0, 1, 2, 3)]
    assert states == sorted(states, reverse=True) and states[3] < states[0] / 10
    assert estimate(activation_checkpointing=True, **kw).activation_gib < estimate(**kw).activation_gib / 5


def test_time_follows_throughput():
    e = estimate("base", 512, 8192, 32, 8, 8, tokens_per_sec_per_gpu=100_000, steps=1000)
    assert e.step_seconds == pytest.approx(4_194_304 / (100_000 * 64))
    assert e.total_hours == pytest.approx(e.step_seconds * 1000 / 3600)


@pytest.mark.slow
def test_cli_prints_plan_and_one_line_errors():
    ok = subprocess.run(["roberta-pl-plan", "--model", "base", "--nodes", "8"], capture_output=True, text=True)
    assert ok.returncode == 0 and "accumulation 4 x 64 GPUs" in ok.stdout and "memory per GPU" in ok.stdout
    bad = subprocess.run(["roberta-pl-plan", "--global-batch", "100"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "not divisible" in bad.stderr


# -- the time model: strategies and activation checkpointing cost differently ---------------------------------

BASE_64 = dict(model="base", seq_len=512, global_batch=8192, micro_batch=32, nodes=8, gpus_per_node=8)  # accumulation 4


def test_throughput_differs_by_strategy_as_modelled():
    ddp, z3 = estimate(**BASE_64), estimate(zero_stage=3, **BASE_64)
    z3_offload, ckpt = estimate(zero_stage=3, offload=True, **BASE_64), estimate(activation_checkpointing=True, **BASE_64)
    tps = [e.tokens_per_sec_per_gpu for e in (ddp, z3, z3_offload, ckpt)]
    assert len({round(t) for t in tps}) == 4 and ddp.tokens_per_sec_per_gpu == max(tps)
    # Activation checkpointing recomputes each layer's forward: about +33% FLOPs (the head is not recomputed).
    assert 1.30 < ckpt.recompute_factor < 4 / 3
    assert ckpt.compute_seconds == pytest.approx(ddp.compute_seconds * ckpt.recompute_factor)
    assert ckpt.comm_seconds == pytest.approx(ddp.comm_seconds)
    # ZeRO-3 gathers the weights in forward and backward and reduce-scatters the grads every micro-batch: at
    # accumulation 1 that is 1.5x DDP's all-reduce in elements, and it grows with accumulation.
    one = dict(BASE_64, global_batch=2048)
    assert estimate(zero_stage=3, **one).comm_elements == pytest.approx(1.5 * estimate(**one).comm_elements)
    assert z3.comm_elements == pytest.approx(3 * 4 * 63 / 64) and ddp.comm_elements == pytest.approx(2 * 63 / 64)
    assert z3.step_seconds > ddp.step_seconds and z3.compute_seconds == pytest.approx(ddp.compute_seconds)
    # Offload: PCIe-bound. ZeRO-2: the grad shard down every micro-batch, the updated weight shard back once.
    z2_offload = estimate(zero_stage=2, offload=True, **BASE_64)
    shard = z2_offload.params / 64
    assert z2_offload.offload_seconds == pytest.approx((4 + 1) * 2 * shard / 25e9)
    assert z3_offload.offload_seconds > z2_offload.offload_seconds and ddp.offload_seconds == z3.offload_seconds == 0
    assert z3_offload.step_seconds > z3.step_seconds


def test_time_model_follows_each_assumption():
    e = estimate(zero_stage=3, **BASE_64)
    assert estimate(zero_stage=3, mfu=0.9, **BASE_64).compute_seconds == pytest.approx(e.compute_seconds / 2)
    assert estimate(zero_stage=3, inter_node_gbps=80, **BASE_64).comm_seconds == pytest.approx(e.comm_seconds / 2)
    one_node = dict(BASE_64, nodes=1, global_batch=1024)  # within a node the intra-node bandwidth applies
    n = estimate(zero_stage=3, **one_node)
    assert estimate(zero_stage=3, intra_node_gbps=600, **one_node).comm_seconds == pytest.approx(n.comm_seconds / 2)
    assert estimate(zero_stage=3, inter_node_gbps=1, **one_node).comm_seconds == pytest.approx(n.comm_seconds)
    o = estimate(zero_stage=3, offload=True, **BASE_64)
    assert estimate(zero_stage=3, offload=True, pcie_gbps=50, **BASE_64).offload_seconds == pytest.approx(
        o.offload_seconds / 2)
    single = estimate("base", 512, 64, 32, 1, 1, zero_stage=3)
    assert single.comm_seconds == 0 and single.comm_elements == 0


def test_cli_prints_the_assumptions_and_takes_overrides(capsys):
    main(["--model", "base", "--nodes", "8", "--zero", "3"])
    default = capsys.readouterr().out
    assert "assumptions: MFU 45% of 989 TFLOP/s" in default
    assert "intra-node 300 GB/s" in default and "inter-node 40 GB/s" in default and "PCIe 25 GB/s" in default
    main(["--model", "base", "--nodes", "8", "--zero", "3", "--mfu", "0.3", "--peak-tflops", "312",
          "--intra-node-bw", "150", "--inter-node-bw", "25", "--pcie-bw", "16"])
    custom = capsys.readouterr().out
    assert "MFU 30% of 312 TFLOP/s" in custom and "intra-node 150 GB/s" in custom
    assert "inter-node 25 GB/s" in custom and "PCIe 16 GB/s" in custom

    def throughput(out):
        return next(line for line in out.splitlines() if line.startswith("throughput:"))

    assert throughput(default) != throughput(custom)


def test_one_node_and_one_gpu_are_singular(capsys):
    main(["--model", "base", "--nodes", "1", "--gpus-per-node", "8", "--global-batch", "256"])
    out = capsys.readouterr().out
    assert "x 8 GPUs (1 node x 8)" in out and "1 nodes" not in out
    main(["--model", "base", "--nodes", "1", "--gpus-per-node", "1", "--global-batch", "32"])
    out = capsys.readouterr().out
    assert "x 1 GPU (1 node x 1)" in out and "1 GPUs" not in out


def test_sequence_length_defaults_to_what_the_preset_accepts(capsys):
    tiny_max = RobertaConfig.from_name("tiny").max_seq_len
    assert tiny_max < 512
    e = estimate("tiny", None, 64, 8, 1, 8)
    assert e.seq_len == tiny_max and e.tokens_per_step == 64 * tiny_max
    assert estimate("base", None, 64, 8, 1, 8).seq_len == 512 and estimate("tiny", 64, 64, 8, 1, 8).seq_len == 64
    main(["--model", "tiny", "--global-batch", "64", "--micro-batch", "8"])
    assert f"tokens per step: 64 x {tiny_max} = {64 * tiny_max:,}" in capsys.readouterr().out


def test_indivisible_shape_suggests_a_micro_batch_that_divides():
    with pytest.raises(BatchPlanError) as err:
        estimate("base", 512, 8000, 32, 8, 8)  # 8000 / 64 GPUs = 125 per GPU: micro 25 x accumulation 5
    message = str(err.value)
    assert "--micro-batch 25 (accumulation 5)" in message and "6144 or 8192" in message
    assert estimate("base", 512, 8000, 25, 8, 8).accumulation == 5  # the suggestion works
    with pytest.raises(BatchPlanError, match="do not split over 8 GPUs"):
        estimate("base", 512, 100, 32, 1, 8)
    bad = subprocess.run(["roberta-pl-plan", "--global-batch", "8000", "--nodes", "8"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "--micro-batch 25" in bad.stderr


# -- memory per rank under DDP, ZeRO-2 and ZeRO-3 --------------------------------------------------------------

def test_memory_per_rank_shrinks_from_ddp_to_zero2_to_zero3():
    e = estimate("base", 512, 256, 32, 1, 8)  # 8 ranks, bf16
    P, N = e.params, 8
    ddp, z2, z3 = (e.stages[s].state_gib * 2**30 for s in (0, 2, 3))
    assert ddp > z2 > z3
    assert ddp == pytest.approx(16 * P)  # fp32 weights, grads, Adam m and v
    assert z2 == pytest.approx(2 * P + (2 + 12) * P / N)  # bf16 weights whole; grads and master + m + v sharded
    assert z3 == pytest.approx(16 * P / N) and z3 / ddp == pytest.approx(1 / N)
    assert e.stages[3].activation_gib == e.stages[0].activation_gib  # ZeRO does not shard activations
    f = estimate("small", 128, 8, 2, 1, 2, precision="fp32")  # the bench's shape: 2 ranks, fp32
    ddp, z2, z3 = (f.stages[s].state_gib * 2**30 / f.params for s in (0, 2, 3))
    assert (ddp, z2, z3) == pytest.approx((16, 4 + (4 + 12) / 2, (4 + 4 + 12) / 2))


def test_cli_prints_memory_for_every_strategy(capsys):
    main(["--model", "large", "--nodes", "4"])
    out = capsys.readouterr().out
    rows = {line.split()[0] + (line.split()[1] if line.split()[0] == "DDP" else ""): line
            for line in out.splitlines() if line.startswith("  ") and ("ZeRO" in line or "DDP" in line)}
    assert set(rows) == {"DDP(ZeRO-0)", "ZeRO-1", "ZeRO-2", "ZeRO-3"} and rows["DDP(ZeRO-0)"].endswith("<")
    assert "5.30 GiB" in rows["DDP(ZeRO-0)"]  # 355M x 16 bytes


@pytest.mark.slow
def test_zero_memory_bench_smoke(tmp_path):
    """bench/zero_memory.py --quick on 2 CPU ranks (~35 s): it runs, writes its JSON, and ZeRO-3 holds less."""
    import json
    import os
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "bench" / "zero_memory.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--strategies", "ddp,zero3", "--out-dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["strategy"]: r for r in json.loads((tmp_path / "zero_memory_tiny.json").read_text())["rows"]}
    assert rows["ddp"]["measured_state_bytes"] == pytest.approx(rows["ddp"]["predicted_state_bytes"], rel=0.01)
    assert rows["zero3"]["measured_state_bytes"] < 0.8 * rows["ddp"]["measured_state_bytes"]
    assert all(r["allocator_peak_bytes"] >= r["measured_state_bytes"] for r in rows.values())


def test_a_budget_buys_the_steps_and_tokens_that_fit(capsys):
    from roberta_pl.cli.plan import budget_buys

    e = estimate("base", 512, 8192, 32, 8, 8, tokens_per_sec_per_gpu=100_000)
    steps, tokens = budget_buys(e, 2 * 3600)
    assert steps == int(7200 // e.step_seconds) and tokens == steps * 4_194_304
    assert (steps + 1) * e.step_seconds > 7200 >= steps * e.step_seconds  # the most whole steps that fit
    main(["--model", "base", "--nodes", "8", "--tokens-per-sec-per-gpu", "100000", "--budget", "2h"])
    assert f"budget 2h buys {steps:,} steps = {tokens:,} tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"--budget='two hours'"):
        main(["--budget", "two hours"])


def test_cli_plans_modernbert_base_with_local_attention_over_its_window(capsys):
    main(["--model", "modernbert_base", "--seq-len", "8192", "--global-batch", "64", "--micro-batch", "4"])
    out = capsys.readouterr().out
    assert "model modernbert_base: 149.7M parameters" in out
    windowed = estimate("modernbert_base", 8192, 64, 4, 1, 8).flops_per_token
    all_global = mlm_flops_per_token(RobertaConfig.from_name("modernbert_base", global_attn_every_n_layers=1), 8192)
    assert f"{windowed / 1e9:.2f} GFLOP/token" in out and windowed < 0.6 * all_global
