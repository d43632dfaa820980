#!/usr/bin/env python3
"""LoRA training speed of PyTorch + transformers + peft (CPU) on a GGUF model, for `apprentice bench train`.

The workload of `apprentice_train::bench`: LoRA r (alpha 2r, no dropout) on all 7 projections
(q,k,v,o,gate,up,down), AdamW lr 3e-4, fp32 weights dequantised from the GGUF by transformers, a
batch of `batch` rows of `seq_len` random token ids, every position trained (causal LM loss).
The first step is a warm-up; tokens/s is over the rest. Prints one JSON line.
Needs `pip install torch --index-url https://download.pytorch.org/whl/cpu && pip install transformers peft gguf`.
"""
import argparse
import json
import os
import resource
import sys
import time

INSTALL = "pip install torch --index-url https://download.pytorch.org/whl/cpu && pip install transformers peft gguf"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    missing = []
    for module in ("torch", "transformers", "peft", "gguf"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        print(json.dumps({"error": "missing Python packages: " + ", ".join(missing), "missing": missing, "install": INSTALL}))
        return 3

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import peft
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    folder, name = os.path.split(os.path.abspath(args.gguf))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=targets))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq_len + 1))
    inputs, labels = ids[:, :-1], ids[:, 1:]
    times = []
    for _ in range(max(2, args.steps)):
        t0 = time.perf_counter()
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), labels.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    timed = times[1:]
    tokens = args.batch * args.seq_len
    print(json.dumps({
        "tokens_per_s": tokens * len(timed) / sum(timed),
        "s_per_step": sum(timed) / len(timed),
        "timed_steps": len(timed),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
