"""Host cost of the block manager's calls (pure Python): what admission and each step pay.

python benchmarks/block_manager_cost.py [--rows 64] [--prompt 512] [--block-size 16]
"""

from __future__ import annotations

import argparse
import random
import time

from hotmerge.engine.block_manager import BlockManager


def per_call_us(fn, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args()
    rng = random.Random(0)
    prompt = [rng.randrange(32000) for _ in range(args.prompt)]
    pool = BlockManager(args.rows * (args.prompt // args.block_size + 16), args.block_size)
    warm = pool.allocate(prompt, "adapter")
    pool.commit(warm, prompt, len(prompt))

    def hit():
        pool.release(pool.allocate(prompt, "adapter"))

    def miss():
        pool.release(pool.allocate(prompt, "other"))

    def miss_commit():
        t = pool.allocate(prompt, "other")
        pool.commit(t, prompt, len(prompt))
        pool.release(t)

    rows = []
    for i in range(args.rows):
        tokens = prompt[:-1] + [i]
        rows.append((pool.allocate(tokens, "adapter"), tokens))

    def decode_step():  # every row: one more token, grow + commit
        for table, tokens in rows:
            tokens.append(7)
            pool.grow(table, len(tokens))
            pool.commit(table, tokens, len(tokens) - 1)

    print(f"block_size {args.block_size}, prompt {args.prompt} tokens, {args.rows} rows")
    print(f"allocate, prefix hit  : {per_call_us(hit, args.reps):8.1f} us/call")
    print(f"allocate, miss        : {per_call_us(miss, args.reps):8.1f} us/call")
    print(f"allocate+commit, miss : {per_call_us(miss_commit, args.reps):8.1f} us/call")
    steps = min(args.reps, 100)
    print(f"decode step, {args.rows} rows : {per_call_us(decode_step, steps):8.1f} us/step")


if __name__ == "__main__":
    main()
