"""The peer on our associative retrieval: lucidrains' recurrent-memory-transformer-pytorch (the `bench` extra)
trained on rmt-bench's own task batches and scored with the same metric on the same test split.

    python scripts/peer_retrieval.py --segments 2 --mem 5 --steps 8000 --seed 0 [--pairs 4] [--curriculum] \
        [--precision bf16]

Sizes as the paper's retrieval model (6 layers, d_model 64, 4 heads of 32, feed-forward 2x), memory `--mem`, the
optimisation of `experiment=fig3_retrieval_cpu` (AdamW 5e-4, betas 0.9 / 0.99, 100 warm-up steps then cosine to
1e-5 over the steps, clip 1.0, batch 32, full BPTT). `--curriculum`: the same stages, batches and advance rule as
that experiment (rmt_bench.train.curriculum), validated every 250 steps. The answer is one token, so greedy
accuracy is the argmax at the query; the best validation's weights are tested, as rmt-bench does. Prints one
JSON line per validation and a last one with the test accuracy.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F
from recurrent_memory_transformer_pytorch import RecurrentMemoryTransformer

from rmt_bench.config import CurriculumConfig, TaskConfig, TrainerConfig
from rmt_bench.tasks import build_task
from rmt_bench.train.curriculum import Curriculum
from rmt_bench.train.loop import TrainState, autocast_factory, lr_factor


def logits_at_answer(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The peer over a batch's segments (memory carried) -> logits at every answer position and their targets."""
    memories, outs = None, []
    for s in range(batch.inputs.shape[1]):
        logits, memories, _ = model(batch.inputs[:, s], memories)
        outs.append(logits)
    logits = torch.stack(outs, 1)  # (B, S, n, V)
    return logits[batch.loss_mask].float(), batch.targets[batch.loss_mask]


@torch.no_grad()
def accuracy(model, task, split: str, autocast) -> float:
    model.eval()
    right = total = 0
    for batch in task.eval_batches(split, 500):
        with autocast():
            logits, targets = logits_at_answer(model, batch)
        right += (logits.argmax(-1) == targets).sum().item()
        total += targets.numel()
    model.train()
    return right / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--segments", type=int, default=2)
    ap.add_argument("--mem", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=4, help="key-value pairs per example (the paper's 4)")
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--curriculum", action="store_true")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    task = build_task(TaskConfig(name="retrieval", num_pairs=args.pairs, segments=args.segments))
    trainer = TrainerConfig(optimizer="adamw", lr=5e-4, betas=(0.9, 0.99), schedule="cosine", warmup_steps=100,
                            min_lr=1e-5, grad_clip=1.0, batch_size=32, max_steps=args.steps)  # fmt: skip
    stages = CurriculumConfig(key="num_pairs", stages=list(range(1, args.pairs)), threshold=0.95, max_stage_steps=2000)
    curriculum = Curriculum(stages if args.curriculum else CurriculumConfig(), task)
    model = RecurrentMemoryTransformer(
        64, num_tokens=task.vocab_size, depth=6, num_memory_tokens=args.mem, seq_len=task.segment_len, heads=4,
        dim_head=32, ff_mult=2, use_xl_memories=False,
    )  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=trainer.lr, betas=trainer.betas)
    autocast = autocast_factory(torch.device("cpu"), args.precision == "bf16")
    st, best, best_weights, start = TrainState(), -1.0, None, time.time()
    batches = curriculum.batches(st, trainer.batch_size, args.seed)
    while st.step < args.steps:
        for group in opt.param_groups:
            group["lr"] = trainer.lr * lr_factor(trainer, st.step, args.steps)
        batch = next(batches)
        opt.zero_grad(set_to_none=True)
        with autocast():
            logits, targets = logits_at_answer(model, batch)
        F.cross_entropy(logits, targets).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.grad_clip)
        opt.step()
        st.step += 1
        if st.step % 250 == 0 or st.step == args.steps:
            row = {"step": st.step, "stage": st.stage, "val_acc": accuracy(model, task, "valid", autocast)}
            if row["val_acc"] > best:
                best, best_weights = row["val_acc"], copy.deepcopy(model.state_dict())
            if args.curriculum and st.stage < curriculum.last:
                row["stage_acc"] = accuracy(model, curriculum.task(st.stage), "valid", autocast)
                curriculum.advance(st, row["stage_acc"])
            print(json.dumps(row | {"minutes": round((time.time() - start) / 60, 2)}), flush=True)
    model.load_state_dict(best_weights)
    test = accuracy(model, task, "test", autocast)
    print(json.dumps({"test_acc": test, "best_val_acc": best, "steps": st.step, "curriculum": args.curriculum,
                      "stage_starts": st.stage_starts, "minutes": round((time.time() - start) / 60, 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
