#!/usr/bin/env python3
"""Prefill and decode speed of llama.cpp (through `llama-cpp-python`) on a GGUF model, for
`apprentice bench model`.

llama.cpp computes in the GGUF's own storage type (a Q4_1 file runs quantised kernels, an f16 file
f16 weights, an f32 file f32 weights). It runs exactly the prompt token ids it is given: prefill is
one evaluation of the prompt from an empty cache (logits of the last position only); decode is
greedy, token by token, with the KV cache. Prints one JSON line. Needs
`CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python` (a source build, about 10 minutes on
2 cores) and numpy.
"""
import argparse
import json
import statistics
import sys
import time

INSTALL = 'CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF" pip install llama-cpp-python numpy'


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gguf", required=True, help="the GGUF file")
    parser.add_argument("--prompt-ids", required=True, help="JSON list of prompt token ids")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", default="the GGUF's own storage type", help="what the weights are, for the report")
    args = parser.parse_args()

    missing = []
    for module in ("llama_cpp", "numpy"):
        try:
            __import__(module)
        except ImportError:
            missing.append("llama-cpp-python" if module == "llama_cpp" else module)
    if missing:
        print(json.dumps({"error": "missing Python packages: " + ", ".join(missing), "missing": missing, "install": INSTALL}))
        return 3

    import llama_cpp
    import numpy as np

    prompt = json.loads(args.prompt_ids)
    started = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=args.gguf,
        n_ctx=len(prompt) + args.decode_tokens + 16,
        n_batch=max(512, len(prompt)),
        n_ubatch=max(512, len(prompt)),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        logits_all=False,
        verbose=False,
    )
    load_s = time.perf_counter() - started
    n_vocab = llm.n_vocab()

    def last_logits():
        # `Llama.eval` keeps no logits unless `logits_all`; read the last position's from the context.
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))

    def run(ids, steps):
        """Greedy generation of 1 + `steps` tokens; returns (prefill seconds, decode seconds, tokens)."""
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        token = int(np.argmax(last_logits()))
        tokens = [token]
        t1 = time.perf_counter()
        for _ in range(steps):
            llm.eval([token])
            token = int(np.argmax(last_logits()))
            tokens.append(token)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, tokens

    run(prompt[: min(len(prompt), 16)], 4)  # warm-up
    prefill, decode, tokens = [], [], []
    for _ in range(args.repeats):
        p, d, tokens = run(prompt, args.decode_tokens)
        prefill.append(p)
        decode.append(d)

    print(
        json.dumps(
            {
                "implementation": "llama.cpp",
                "version": f"llama-cpp-python {llama_cpp.__version__}",
                "runs": args.runs,
                "threads": args.threads,
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
