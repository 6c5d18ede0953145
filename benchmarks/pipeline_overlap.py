"""The overlapped F&B pair against the forward followed by the backward, on two ranks with the
routed experts spread over them (EP=2, no pipeline), through the executor's piece machinery:
a stage of MoE decoder layers cut into pieces (`DecoderLayer.pieces`: attention, dispatch,
experts, combine), run by `pieces.forward_steps` / `backward_steps`, paired by
`overlap.overlapped_forward_backward`.

    torchrun --nproc-per-node 2 benchmarks/pipeline_overlap.py --json overlap.json
    python benchmarks/pipeline_overlap.py --device cpu --nproc 2 --json overlap_cpu.json

Each timed iteration starts from micro-batch 0's forward (untimed) and then times either
micro-batch 1's forward followed by micro-batch 0's backward ("separate"), or the two as one
overlapped pair with the all-to-all pieces on a second CUDA stream ("overlapped"), or the pair's
order on one stream ("overlapped_one_stream", which isolates what the second stream adds).
Reported: median milliseconds (slowest rank), whether the overlapped pair is faster, and the
correctness check: the pair's output, gradients of every parameter and of the input equal those
of the separate run, bitwise (torch's deterministic algorithms are switched on for the check),
with the difference between two separate runs as the noise floor where bitwise equality cannot
hold on the device.

GPU shape (DeepSeek-V2-Lite's MoE layer): hidden 2048, 16 heads of MLA (kv rank 512), 64
routed experts of width 1408 (32 per rank), 6 per token, 2 shared experts, bf16, 4 layers,
4096 tokens per micro-batch; fp32 weights under bf16 autocast, as megads trains in bf16. On
CPU a tiny fp32 version of the same. CUBLAS_WORKSPACE_CONFIG=:4096:8 is set (deterministic
cuBLAS for the check) unless already set.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")      # cuBLAS under deterministic algorithms (the check)

from megads.config import Config, ModelConfig, ParallelConfig                  # noqa: E402
from megads.parallel.builder import build_model                                # noqa: E402
from megads.parallel.mesh import build_mesh                                    # noqa: E402
from megads.parallel.pipeline.overlap import Chain, Streams, overlapped_forward_backward, run_all  # noqa: E402
from megads.parallel.pipeline.pieces import backward_steps, forward_steps, under_autocast      # noqa: E402

GPU_MODEL = dict(vocab_size=1024, hidden_size=2048, num_heads=16, q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128,
                 qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, moe_intermediate_size=1408,
                 n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1, init_std=0.02)
CPU_MODEL = dict(vocab_size=64, hidden_size=64, num_heads=2, q_lora_rank=0, kv_lora_rank=32, qk_nope_head_dim=16,
                 qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, moe_intermediate_size=32,
                 n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, init_std=0.1)


class Bench:
    """Micro-batches 0 and 1 through this rank's stage of MoE layers."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        shape = GPU_MODEL if device.type == "cuda" else CPU_MODEL
        self.cfg = ModelConfig(**shape, num_layers=args.layers, first_k_dense=0,
                               max_position_embeddings=max(4096, args.seq_len))
        self.device = device
        parallel = ParallelConfig(ep=dist.get_world_size())
        model = build_model(Config(model=self.cfg, parallel=parallel), build_mesh(parallel), device).model
        for moe in model.moe_layers():
            moe.balance_alpha = 1e-4
        self.model = model
        self.cos, self.sin = model.rope(args.seq_len, device)
        g = torch.Generator().manual_seed(1 + dist.get_rank())
        size = (args.micro_batch, args.seq_len, self.cfg.hidden_size)
        self.inputs = [torch.randn(size, generator=g).to(device) for _ in range(2)]
        self.grad = (torch.randn(size, generator=g) * 1e-2).to(device)

    def autocast(self) -> contextlib.AbstractContextManager:
        """As training in bf16: fp32 weights, bf16 autocast on CUDA."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()

    def pieces(self) -> list:
        return under_autocast([p._replace(name=f"{i}.{p.name}") for i, layer in self.model.layers.items()
                               for p in layer.pieces(self.cos, self.sin)], self.autocast)

    def forward(self, x: torch.Tensor, cuts: list, result: list) -> Chain:
        pieces = self.pieces()
        return Chain(pieces, forward_steps(pieces, x, cuts, result))

    def backward(self, cuts: list) -> Chain:
        return Chain([c.piece for c in reversed(cuts)], backward_steps(cuts, self.grad))

    def run(self, variant: str) -> tuple[float, dict]:
        """One iteration of a variant; -> (seconds of the timed part, outputs to compare)."""
        streams = Streams(self.device if variant != "overlapped_one_stream" else torch.device("cpu"))
        self.model.zero_grad(set_to_none=True)
        x0, x1 = (x.detach().requires_grad_() for x in self.inputs)
        cuts0, cuts1, result = [], [], []
        run_all(self.forward(x0, cuts0, []), streams)
        forward, backward = self.forward(x1, cuts1, result), self.backward(cuts0)
        self.sync()
        start = time.perf_counter()
        if variant == "separate":
            run_all(forward, streams)
            run_all(backward, streams)
        else:
            overlapped_forward_backward(forward, backward, streams)
        self.sync()
        seconds = time.perf_counter() - start
        outputs = {"output": result[0].detach(), "input grad": x0.grad}
        outputs.update({n: p.grad for n, p in self.model.named_parameters() if p.grad is not None})
        return seconds, outputs

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dist.barrier()


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), "the runs produced different sets of gradients"
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a.values(), b.values()))


def check(bench: Bench) -> dict:
    """FB against F-then-B with deterministic kernels; a second F-then-B gives the noise floor."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        _, separate = bench.run("separate")
        separate = {k: v.clone() for k, v in separate.items()}
        _, again = bench.run("separate")
        again = {k: v.clone() for k, v in again.items()}
        _, paired = bench.run("overlapped")
    finally:
        torch.use_deterministic_algorithms(False)
    bitwise = all(torch.equal(paired[k], separate[k]) for k in separate) and paired.keys() == separate.keys()
    diff, floor = max_abs_diff(paired, separate), max_abs_diff(again, separate)
    return {"tensors": len(separate), "bitwise_equal": bitwise, "max_abs_diff": diff, "noise_floor": floor,
            "equal": bitwise or diff <= floor}


def time_variants(bench: Bench, warmup: int, iters: int) -> dict:
    times = {}
    for variant in ("separate", "overlapped", "overlapped_one_stream"):
        runs = []
        for i in range(warmup + iters):
            seconds, _ = bench.run(variant)
            if i >= warmup:
                slowest = torch.tensor([seconds], dtype=torch.float64, device=bench.device)
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                runs.append(slowest.item())
        times[variant] = 1e3 * statistics.median(runs)
    return times


def main_rank(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_world_size() != 2:
        raise SystemExit(f"run on 2 ranks (EP=2), got {dist.get_world_size()}")
    bench = Bench(args, device)
    correctness = check(bench)
    times = time_variants(bench, args.warmup, args.iters)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "ranks": 2, "ep": 2, "layers": args.layers,
              "tokens_per_micro_batch": args.micro_batch * args.seq_len, "hidden": bench.cfg.hidden_size,
              "routed_experts": bench.cfg.n_routed_experts, "top_k": bench.cfg.num_experts_per_tok,
              "check": correctness, "ms": times,
              "overlapped_faster": times["overlapped"] < times["separate"],
              "speedup": times["separate"] / times["overlapped"]}
    if dist.get_rank() == 0:
        c = correctness
        print(f"{report['device']}: {args.layers} MoE layers, EP=2, {report['tokens_per_micro_batch']} tokens per "
              f"micro-batch")
        print(f"check: FB vs F-then-B over {c['tensors']} tensors: bitwise {c['bitwise_equal']}, max |diff| "
              f"{c['max_abs_diff']:.3g} (noise floor of two F-then-B runs {c['noise_floor']:.3g}) -> "
              f"{'equal' if c['equal'] else 'DIFFERENT'}")
        for variant, ms in times.items():
            print(f"{variant:>22}: {ms:9.2f} ms")
        print(f"overlapped pair faster: {report['overlapped_faster']} (speedup {report['speedup']:.3f}x)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    if not correctness["equal"]:
        raise SystemExit("the overlapped pair's gradients differ from the forward followed by the backward")


def _spawned(rank: int, args: argparse.Namespace, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(args.nproc),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    main_rank(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--nproc", type=int, default=0, help="spawn this many ranks here (instead of torchrun)")
    parser.add_argument("--layers", type=int, default=None, help="MoE layers in the stage (4 on GPU, 2 on CPU)")
    parser.add_argument("--seq-len", type=int, default=None, help="4096 on GPU, 32 on CPU")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    gpu = args.device == "cuda"
    defaults = {"layers": 4 if gpu else 2, "seq_len": 4096 if gpu else 32, "warmup": 3 if gpu else 1,
                "iters": 10 if gpu else 3}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.nproc:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_spawned, args=(args, port), nprocs=args.nproc)
    else:
        main_rank(args)


if __name__ == "__main__":
    main()
