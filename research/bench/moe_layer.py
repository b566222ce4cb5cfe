"""One MoE FFN layer in inference: our token-routed MoELayer against fairscale's MOELayer +
Top2Gate (the peer implementation) on the same input and weights, our task-routed layer, and a
dense FFN of the active width as the floor, for several expert counts.

    OMP_NUM_THREADS=1 .venv/bin/python -m research.bench.moe_layer --experts 8,32,128 --threads 1

Variants, all in eval mode under torch.inference_mode, on one random input x [T, B, C] of
N = T*B tokens (no padding), top-2, experts of width F (so the active FFN width is 2F):
  ours token top-2              MoELayer(build_router("token")), dropless in eval
                                (eval_capacity_factor None)
  fairscale MOELayer+Top2Gate   its own capacity rule (below)
  ours target (task) top-2      MoELayer(build_router("target")), one target language for the
                                batch, through whatever inference path MoELayer takes (with
                                task_merge.py: the task's 2 experts merged into one FFN, built
                                during warm-up)
  dense FFN (active width)      experts.FeedForward(C, 2F): the two active experts' compute,
                                no routing: the floor
The three MoE variants run the very same expert modules (ExpertFFNs, relu; dropout is a no-op in
eval); Top2Gate gets a copy of our TokenGate weight. Timing: --warmup forwards of each variant,
then --reps rounds, each running every variant once in a rotated order, so that drifts of a busy
machine hit every variant alike; median and min ms per forward, and ratios of medians taken
within the same run.

What fairscale 0.4.13 (fairscale/nn/moe/{moe_layer,top2gate}.py) does differently:
- capacity: fixed at 2N/E assignments per expert (factor 1.0, not configurable; it asserts
  N % E == 0); assignments past it are dropped, top-1 choices claiming slots before top-2 (as
  ours do when a capacity is set). Ours are dropless in eval.
- noise: the second expert is chosen by Gumbel-max on logits + Gumbel noise, in eval too (there
  is no training check), so its routing, and its output, changes from one forward to the next.
  The first expert is the argmax, as ours.
- normalisation: the two kept probabilities are renormalised after dropping (a token that lost
  its second expert keeps the first at weight 1); ours renormalise before (GShard Algorithm 2).
- dispatch: einsums on dense one-hot tensors [N, E, 2N/E] ("sec,sm->ecm" and "sec,ecm->sm"),
  N x 2N x C multiply-adds each whatever E (N/F times the experts' own 4NCF: as much at the
  defaults), and every expert runs on its whole capacity buffer, empty slots included (2N rows
  in all); ours sort assignments by expert, index_select them and index_add the weighted outputs
  back, so an expert runs only on the tokens it got.
- distribution: MOELayer reads the world size of its group (default dist.group.WORLD) at
  construction and sends the dispatched buffer through all_to_all_single twice per forward.
  Here it gets a 1-process gloo group on an in-process HashStore (no network), where the
  all-to-all is a copy. It asserts input.shape[0] % len(experts) == 0, so it gets x viewed as
  [N, 1, C] (the same token order as ours). Its gate also computes l_aux; ours compute MoEStats
  (balance and z losses, per-expert counts) on every forward.

Agreement (not timed): with fairscale's Gumbel noise replaced by zeros it routes as ours (same
top-1 and top-2 up to ties), so on the tokens whose two assignments it kept the outputs agree to
float rounding: the script reports max |ours - fairscale| over them and how many they are. With
noise on (as timed) it reports the assignments dropped on one forward and the share of tokens
sent to an expert outside our top-2.

Results go to stdout as they come, to --json and to --markdown (written atomically).
"""

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from contextlib import contextmanager
from types import SimpleNamespace
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

warnings.filterwarnings("ignore", category=FutureWarning)  # fairscale vs current torch
from fairscale.nn.moe import MOELayer, Top2Gate, top2gate  # noqa: E402
from fairseq_taskmoe.atomic import write_text_atomically  # noqa: E402
from fairseq_taskmoe.moe.experts import ExpertFFNs, FeedForward  # noqa: E402
from fairseq_taskmoe.moe.moe_layer import MoELayer  # noqa: E402
from fairseq_taskmoe.moe.routing import TaskIds, build_router  # noqa: E402
from research.common import LANGS, REPO  # noqa: E402

OURS, FAIRSCALE, TASK, DENSE = ("ours token top-2", "fairscale MOELayer+Top2Gate",
                                "ours target (task) top-2", "dense FFN (active width)")
NUM_LANGS = len(LANGS)  # as the demo: en, de, fr, cs


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def parse_args(argv=None):
    head, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(prog="python -m research.bench.moe_layer",
                                description=head, epilog=rest,
                                formatter_class=HelpFormatter)
    p.add_argument("--experts", default="8,32,128",
                   help="comma-separated expert counts, each dividing --tokens (fairscale)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens N per forward")
    p.add_argument("--batch", type=int, default=64, help="rows B; x is [N/B, B, C]")
    p.add_argument("--embed-dim", type=int, default=512, help="model width C")
    p.add_argument("--ffn-dim", type=int, default=2048,
                   help="each expert's inner width F; top-2 makes the active width 2F, the "
                        "dense floor's width")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--reps", type=int, default=20, help="timed rounds (every variant once each)")
    p.add_argument("--warmup", type=int, default=3, help="untimed forwards of each variant")
    p.add_argument("--seed", type=int, default=0, help="weights, input and fairscale's noise")
    p.add_argument("--json", default=str(REPO / "results" / "moe_layer_bench.json"),
                   help="every timing and the routing checks")
    p.add_argument("--markdown", default=str(REPO / "results" / "moe_layer_bench.md"),
                   help="the tables, headed by the command line and machine")
    args = p.parse_args(argv)
    args.experts = [int(e) for e in args.experts.split(",")]
    if args.tokens % args.batch:
        p.error(f"--tokens {args.tokens} is not a multiple of --batch {args.batch}")
    for e in args.experts:
        if e < 2 or args.tokens % e:
            p.error(f"{e} experts: need at least 2, dividing --tokens {args.tokens} (Top2Gate "
                    "asserts N % E == 0)")
    return args


@contextmanager
def one_process_group():
    """The 1-process gloo group MOELayer needs (in-process store: no port, no network)."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()


def build(num_experts, args):
    """Input and the four layers for one expert count; seeded, so a caller can rebuild it."""
    torch.manual_seed(args.seed)
    C, F_ = args.embed_dim, args.ffn_dim
    x = torch.randn(args.tokens // args.batch, args.batch, C)
    experts = ExpertFFNs(C, [F_] * num_experts, F.relu, nn.Identity())
    ours = MoELayer(build_router("token", C, num_experts, 2, NUM_LANGS, False), experts,
                    capacity_factor=None, eval_capacity_factor=None)
    gate = Top2Gate(C, num_experts)
    with torch.no_grad():
        gate.wg.weight.copy_(ours.router.wg.weight)
    fairscale = MOELayer(gate, nn.ModuleList(experts.experts))  # the same expert modules
    task = MoELayer(build_router("target", C, num_experts, 2, NUM_LANGS, False), experts,
                    capacity_factor=None, eval_capacity_factor=None)
    task_ids = TaskIds(torch.zeros(args.batch, dtype=torch.long),  # every row en -> de
                       torch.ones(args.batch, dtype=torch.long), NUM_LANGS)
    dense = FeedForward(C, 2 * F_, F.relu, nn.Identity())
    for layer in (ours, fairscale, task, dense):
        layer.eval()
    return SimpleNamespace(x=x, ours=ours, fairscale=fairscale, task=task, task_ids=task_ids,
                           dense=dense)


def variants(s):
    """name -> forward with no argument, returning the layer output [T, B, C]."""
    flat = s.x.view(-1, 1, s.x.size(-1))  # [N, 1, C]: MOELayer wants shape[0] % E == 0
    return {OURS: lambda: s.ours(s.x)[0],
            FAIRSCALE: lambda: s.fairscale(flat).view_as(s.x),
            TASK: lambda: s.task(s.x, task_ids=s.task_ids)[0],
            DENSE: lambda: s.dense(s.x)}


def time_interleaved(fns, warmup, reps):
    """name -> ms per forward over `reps` rounds; round r runs the variants rotated by r."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times = {name: [] for name in names}
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            start = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def summarise(times):
    median = {name: statistics.median(t) for name, t in times.items()}
    return {name: {"median_ms": median[name], "min_ms": min(t), "times_ms": t,
                   "vs_ours_token": median[name] / median[OURS],
                   "vs_dense": median[name] / median[DENSE]} for name, t in times.items()}


def fairscale_routing(s, seed):
    """Drops and routing differences of Top2Gate on this input; agreement with ours when its
    Gumbel noise is off (see the module docstring)."""
    N, C = s.x.size(0) * s.x.size(1), s.x.size(-1)
    tokens, E = s.x.reshape(N, C), len(s.ours.experts)
    ours_out, stats = s.ours(s.x)
    top2 = s.ours.router(s.x, torch.ones(s.x.shape[:2], dtype=torch.bool)).expert_indices
    ours_sets = F.one_hot(top2, E).sum(1).bool()  # [N, E]
    torch.manual_seed(seed)  # the noise of this one forward
    _, _, dispatch_mask = s.fairscale.gate(tokens)  # [N, E, capacity], with noise: as timed
    kept = dispatch_mask.any(-1)  # [N, E]
    no_noise = lambda shape, device: torch.zeros(shape, device=device)  # noqa: E731
    with mock.patch.object(top2gate, "gumbel_rsample", no_noise):
        _, _, quiet_mask = s.fairscale.gate(tokens)
        quiet_out = s.fairscale(s.x.view(N, 1, C)).view(N, C)
    whole = quiet_mask.flatten(1).sum(-1) == 2  # tokens that kept both assignments
    diff = (quiet_out[whole] - ours_out.reshape(N, C)[whole]).abs()
    return {"capacity": dispatch_mask.size(-1), "assignments": 2 * N,
            "dropped": int(2 * N - dispatch_mask.sum()),
            "ours_dropped": int(stats.dropped),
            "tokens_off_our_top2": int((kept & ~ours_sets).any(-1).sum()),
            "noise_off_dropped": int(2 * N - quiet_mask.sum()),
            "noise_off_tokens_kept_whole": int(whole.sum()),
            "noise_off_max_abs_diff": float(diff.max()) if diff.numel() else None}


def fmt_row(cells):
    return "| " + " | ".join(str(c) for c in cells) + " |"


def timing_rows(result):
    return [fmt_row([result["experts"], name, f"{v['median_ms']:.2f}", f"{v['min_ms']:.2f}",
                     f"{v['vs_ours_token']:.2f}", f"{v['vs_dense']:.2f}"])
            for name, v in result["variants"].items()]


def routing_row(result):
    r = result["fairscale_routing"]
    diff = r["noise_off_max_abs_diff"]
    return fmt_row([result["experts"], r["capacity"],
                    f"{r['dropped']} / {r['assignments']} ({r['dropped'] / r['assignments']:.1%})",
                    f"{r['tokens_off_our_top2']} / {r['assignments'] // 2}",
                    f"{r['noise_off_tokens_kept_whole']}",
                    "-" if diff is None else f"{diff:.1e}"])


TIMING_HEAD = ["| experts | variant | median ms | min ms | vs ours token | vs dense |",
               "|---|---|---|---|---|---|"]
ROUTING_HEAD = ["| experts | fairscale capacity per expert (2N/E) | assignments dropped "
                "(one forward) | tokens sent outside our top-2 (noise on) | tokens kept whole, "
                "noise off | max abs(ours - fairscale) on them |", "|---|---|---|---|---|---|"]


def setup_note(a):
    return (f"x: [T, B, C] = [{a['tokens'] // a['batch']}, {a['batch']}, {a['embed_dim']}] "
            f"({a['tokens']} tokens, no padding); experts of width {a['ffn_dim']}, top-2, so the "
            f"active FFN width is {2 * a['ffn_dim']} (the dense floor's width). Eval mode, "
            f"torch.inference_mode; median and min of {a['reps']} interleaved rounds after "
            f"{a['warmup']} warm-up forward(s) of each variant; ratios are of medians from the "
            "same run. The three MoE variants run the same expert modules; fairscale's gate has "
            "our token gate's weight. fairscale dispatches by einsum over dense [N, E, 2N/E] "
            "one-hot tensors, runs every expert on its whole capacity buffer, and sends the "
            "buffers through all_to_all_single on a 1-process gloo group (a copy). Ours target "
            "is MoELayer's own inference path for a task-routed layer, on a batch of one task. "
            "See the script's docstring.")


ROUTING_NOTE = (
    "Ours are dropless in eval (0 assignments dropped). fairscale drops past a fixed capacity "
    "of 2N/E, renormalises the kept weights after dropping, and picks the second expert with "
    "Gumbel noise in eval too, so its output varies between forwards and differs from ours on "
    "the tokens the noise sends elsewhere. With the noise replaced by zeros (not timed) it "
    "routes as ours; on the tokens whose two assignments it kept the outputs agree to float "
    "rounding (last column).")


def markdown(report):
    return "\n".join([
        "# MoE layer benchmark: ours vs fairscale MOELayer + Top2Gate", "",
        f"Command: `{report['command']}`", "",
        f"{report['date']}; torch {report['torch']}; {report['args']['threads']} thread(s); "
        f"machine: {report['machine']}.", "",
        setup_note(report["args"]), "",
        *TIMING_HEAD, *[row for r in report["results"] for row in timing_rows(r)], "",
        "## fairscale's routing on this input", "", ROUTING_NOTE, "",
        *ROUTING_HEAD, *[routing_row(r) for r in report["results"]], ""])


def machine():
    """platform.processor() (empty on most Linux: then /proc/cpuinfo's model name) and CPUs."""
    name = platform.processor()
    if not name and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), "")
    return f"{name or platform.machine()}, os.cpu_count() = {os.cpu_count()}"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {"command": shlex.join([".venv/bin/python", "-m", "research.bench.moe_layer", *argv]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
              "machine": machine(),
              "args": vars(args), "results": []}
    print("\n".join(TIMING_HEAD), flush=True)
    with one_process_group():
        for num_experts in args.experts:
            setup = build(num_experts, args)  # outside inference_mode: normal parameters
            with torch.inference_mode():
                times = time_interleaved(variants(setup), args.warmup, args.reps)
                routing = fairscale_routing(setup, args.seed)
            result = {"experts": num_experts, "variants": summarise(times),
                      "fairscale_routing": routing}
            report["results"].append(result)
            print("\n".join(timing_rows(result)), flush=True)
            del setup
    print("\n" + "\n".join(ROUTING_HEAD + [routing_row(r) for r in report["results"]]))
    write_text_atomically(args.json, json.dumps(report, indent=1) + "\n")
    write_text_atomically(args.markdown, markdown(report))
    print(f"[bench] wrote {args.json} and {args.markdown}", flush=True)
    return report


if __name__ == "__main__":
    main()
