"""Generation with the KV cache equals transformers' generate token for token (greedy), for
Phi-2 and Phi-3 shapes, single and batched with left padding; sampling is reproducible."""

import pytest
import torch

import phicore
from phicore.generate import filter_top_k, filter_top_p
from tiny_models import save_hf_checkpoint

transformers = pytest.importorskip("transformers")

NEW_TOKENS = 40


def _hf_greedy(hf, prompts, pad_id):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(
        ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
        pad_token_id=pad_id, eos_token_id=None,
    )
    return out[:, width:].tolist()


@pytest.mark.parametrize("shape", ["phi-2", "phi-3-mini-4k", "phi-4-mini"])
def test_greedy_equals_transformers_generate(shape, tmp_path):
    hf = save_hf_checkpoint(shape, tmp_path)
    model = phicore.load_model(tmp_path, dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 9, 3)]
    for p in prompts:  # one at a time
        ours = phicore.generate(model, p, max_new_tokens=NEW_TOKENS)
        assert ours == _hf_greedy(hf, [p], pad_id=0)[0]
    # batched, left padded
    assert phicore.generate(model, prompts, max_new_tokens=NEW_TOKENS, pad_id=0) == _hf_greedy(hf, prompts, 0)


def test_longrope_cache_rebuilt_when_crossing_original_length(tmp_path):
    """Phi-3.5 shape with original length 16: a 10-token prompt generating 20 tokens crosses
    it. With the cache rebuilt at the crossing, the result equals a loop that recomputes the
    whole sequence every step (no cache), and transformers' generate."""
    hf = save_hf_checkpoint("phi-3.5-mini", tmp_path)
    model = phicore.load_model(tmp_path, dtype=torch.float32, device="cpu")
    prompt = torch.randint(3, 512, (10,), generator=torch.Generator().manual_seed(5)).tolist()
    ours = phicore.generate(model, prompt, max_new_tokens=20)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert ours == seq[len(prompt):]
    assert ours == _hf_greedy(hf, [prompt], pad_id=0)[0][:20]


def test_stop_ids_and_streaming(tmp_path):
    save_hf_checkpoint("phi-3-mini-4k", tmp_path)
    model = phicore.load_model(tmp_path, dtype=torch.float32, device="cpu")
    prompt = [5, 17, 42, 99]
    full = phicore.generate(model, prompt, max_new_tokens=30)
    stop = full[6]
    cut = phicore.generate(model, prompt, max_new_tokens=30, stop_ids=[stop])
    assert cut == full[: full.index(stop)]
    streamed = []
    phicore.generate(model, prompt, max_new_tokens=30, stream=lambda toks: streamed.append(toks[0]))
    assert [t for t in streamed if t is not None] == full


def test_sampling_is_seeded_and_filters_work(tmp_path):
    save_hf_checkpoint("phi-2", tmp_path)
    model = phicore.load_model(tmp_path, dtype=torch.float32, device="cpu")
    kwargs = dict(max_new_tokens=20, temperature=0.9, top_p=0.9, top_k=50, repetition_penalty=1.2)
    a = phicore.generate(model, [1, 2, 3], seed=7, **kwargs)
    b = phicore.generate(model, [1, 2, 3], seed=7, **kwargs)
    c = phicore.generate(model, [1, 2, 3], seed=8, **kwargs)
    assert a == b and a != c
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_top_k(logits, 2)).tolist() == [[True, False, False, True]]
    # probs ~ [0.09, 0.67, 0.24, 0.03]: top_p 0.7 keeps the two largest
    assert torch.isinf(filter_top_p(logits, 0.7)).tolist() == [[True, False, False, True]]
