#!/usr/bin/env python3
"""Prefill and decode speed of HF transformers (PyTorch, CPU) on a GGUF model, for `apprentice bench model`.

transformers reads the GGUF with `gguf_file=` and dequantises every tensor to fp32 torch tensors,
so this runs the same fp32 values our candle model computes with. It runs exactly the prompt token
ids it is given: prefill is one forward of the prompt from an empty cache (logits of the last
position only, as `generate` asks for them); decode is greedy, token by token, with the KV cache.
Prints one JSON line. Needs `pip install torch transformers gguf accelerate numpy` (torch from
https://download.pytorch.org/whl/cpu keeps it CPU-only).
"""
import argparse
import inspect
import json
import os
import statistics
import sys
import time

INSTALL = "pip install torch --index-url https://download.pytorch.org/whl/cpu && pip install transformers gguf accelerate numpy"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gguf", required=True, help="the GGUF file")
    parser.add_argument("--prompt-ids", required=True, help="JSON list of prompt token ids")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    missing = []
    for module in ("torch", "transformers", "gguf", "accelerate", "numpy"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        print(json.dumps({"error": "missing Python packages: " + ", ".join(missing), "missing": missing, "install": INSTALL}))
        return 3

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    prompt = json.loads(args.prompt_ids)
    folder, name = os.path.split(os.path.abspath(args.gguf))
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - started

    # transformers 5.x renamed `past_key_values` to `cache`; older releases know only the old name.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def run(ids, steps):
        """Greedy generation of 1 + `steps` tokens; returns (prefill seconds, decode seconds, tokens)."""
        input_ids = torch.tensor([ids], dtype=torch.long)
        t0 = time.perf_counter()
        out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        token = out.logits[0, -1].argmax()
        tokens = [int(token)]
        t1 = time.perf_counter()
        past = getattr(out, cache_arg)
        for _ in range(steps):
            out = model(input_ids=token.view(1, 1), use_cache=True, **{cache_arg: past})
            past = getattr(out, cache_arg)
            token = out.logits[0, -1].argmax()
            tokens.append(int(token))
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, tokens

    with torch.inference_mode():
        run(prompt[: min(len(prompt), 16)], 4)  # warm-up
        prefill, decode, tokens = [], [], []
        for _ in range(args.repeats):
            p, d, tokens = run(prompt, args.decode_tokens)
            prefill.append(p)
            decode.append(d)

    print(
        json.dumps(
            {
                "implementation": "transformers",
                "version": f"transformers {transformers.__version__}, torch {torch.__version__}",
                "runs": "fp32, dequantised from the GGUF by transformers",
                "threads": torch.get_num_threads(),
                "load_s": load_s,
                "prompt_tokens": len(prompt),
                "decode_tokens": args.decode_tokens,
                "prefill_s": prefill,
                "decode_s": decode,
                "prefill_tokens_per_s": len(prompt) / statistics.median(prefill),
                "decode_tokens_per_s": args.decode_tokens / statistics.median(decode) if args.decode_tokens else None,
                "tokens": tokens,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
