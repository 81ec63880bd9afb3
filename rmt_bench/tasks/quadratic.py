"""Quadratic equations (PAPER.md, Table 1): an equation and its solution, written out in 6 steps of 30 characters.

An equation is a*x^2 + b*x + c = 0 with integer coefficients: 80% have integer roots r1, r2 drawn from
[-100, 100] and are multiplied by a factor k drawn from 1..10 (a = k, b = -k(r1 + r2), c = k r1 r2); 20% have no
real root (a = k, b = -k s, c = k t with s drawn from [-200, 200] and t from s^2/4 + 1 .. s^2/4 + 10000, so that
b^2 - 4ac = k^2 (s^2 - 4t) < 0). Each step is left-aligned and filled with spaces to 30 characters:

    step  with real roots (here 3x^2 - 3x - 6)      without real roots (here 2x^2 + 4x + 10)
    1     3*x^2-3*x-6=0                           2*x^2+4*x+10=0              the equation (input)
    2     D=9+72=81                               D=16-80=-64                 b^2 - 4ac, as b^2, -4ac, D
    3     sqrt(D)=9                               D<0                         the square root of D
    4     x1=(3+9)/6=2                            no real x1                  the larger root
    5     x2=(3-9)/6=-1                           no real x2                  the smaller root
    6     x=2,-1                                  no real roots               the answer (x=r for a double root)

Tokens: 0 padding, 1 the start token, then one per character of ALPHABET. The sequence is the start token and the
180 characters; the model reads 180 tokens and predicts the 180 characters. The loss covers steps 2-6 (150
targets), which are generated greedily at evaluation; the headline metric is the exact match of step 6, the
answer (`final_exact`); `exact` is the exact match of all five solution steps.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

STEPS, STEP_CHARS = 6, 30
SEQ_LEN = STEPS * STEP_CHARS  # 180: one step per segment in the paper's 6 x 30 setting
ROOT_RANGE, MAX_FACTOR, ROOTLESS_SHARE = 100, 10, 0.2
ALPHABET = " 0123456789+-*/^=(),<xDsqrtnoeal"  # every character the steps use (the test checks it)
FIRST_CHAR_TOKEN = 2  # after padding (0) and the start token (1)


def solution_steps(a: int, b: int, c: int) -> list[str]:
    """The six steps (unpadded) of the equation a*x^2 + b*x + c = 0, a > 0."""
    d = b * b - 4 * a * c
    steps = [f"{a}*x^2{b:+d}*x{c:+d}=0", f"D={b * b}{-4 * a * c:+d}={d}"]
    if d < 0:
        return [*steps, "D<0", "no real x1", "no real x2", "no real roots"]
    sq = int(round(d**0.5))
    assert sq * sq == d, "the generator only writes equations with an integer square root"
    x1, x2 = (-b + sq) // (2 * a), (-b - sq) // (2 * a)
    answer = f"x={x1}" if x1 == x2 else f"x={x1},{x2}"
    return [*steps, f"sqrt(D)={sq}", f"x1=({-b}+{sq})/{2 * a}={x1}", f"x2=({-b}-{sq})/{2 * a}={x2}", answer]


def draw_equations(size: int, gen: torch.Generator) -> list[tuple[int, int, int]]:
    """`size` coefficient triples (a, b, c), 20% of them without a real root."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    rng = random.Random(seed)
    out = []
    for _ in range(size):
        k = rng.randint(1, MAX_FACTOR)
        if rng.random() < ROOTLESS_SHARE:
            s = rng.randint(-2 * ROOT_RANGE, 2 * ROOT_RANGE)
            t = s * s // 4 + rng.randint(1, 10_000)
        else:
            r1, r2 = rng.randint(-ROOT_RANGE, ROOT_RANGE), rng.randint(-ROOT_RANGE, ROOT_RANGE)
            s, t = r1 + r2, r1 * r2
        out.append((k, -k * s, k * t))
    return out


def encode(steps: list[str]) -> list[int]:
    """Six steps -> 180 tokens, each step filled with spaces to 30 characters."""
    text = "".join(step.ljust(STEP_CHARS) for step in steps)
    assert len(text) == SEQ_LEN, steps
    return [FIRST_CHAR_TOKEN + ALPHABET.index(ch) for ch in text]


def decode(tokens: list[int]) -> list[str]:
    """180 tokens -> six steps, filling stripped (tokens outside the alphabet read as '?')."""
    chars = "".join(
        ALPHABET[t - FIRST_CHAR_TOKEN] if 0 <= t - FIRST_CHAR_TOKEN < len(ALPHABET) else "?" for t in tokens
    )
    return [chars[i : i + STEP_CHARS].rstrip() for i in range(0, SEQ_LEN, STEP_CHARS)]


def make_quadratic(size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """-> sequences (N, 181): start token + 180 characters, and the answer mask over the targets (N, 180)."""
    rows = [[1, *encode(solution_steps(*abc))] for abc in draw_equations(size, gen)]
    seq = torch.tensor(rows, dtype=torch.long)
    mask = torch.zeros(size, SEQ_LEN, dtype=torch.bool)
    mask[:, STEP_CHARS:] = True  # steps 2-6: the solution
    return seq, mask
