# model.py and the HF converter against transformers, in float32, for every architecture variant.
import torch

from generate import generate, load_model


def load(ckpt_dir):
    model = load_model(ckpt_dir / "model.pth", "cpu", torch.float32)
    return model


def test_prefill_and_cached_decode_logits_match(variant):
    name, hf, ckpt_dir = variant
    model = load(ckpt_dir)
    torch.manual_seed(1)
    ids = torch.randint(0, hf.config.vocab_size, (2, 12))
    with torch.no_grad():
        ref = hf(ids).logits
        model.setup_caches(2, 32)
        n_prefill = 7
        out = model(ids[:, :n_prefill], torch.arange(n_prefill))
        steps = [model(ids[:, i:i + 1], torch.tensor([i])) for i in range(n_prefill, ids.size(1))]
    got = torch.cat([out] + steps, dim=1)
    assert ref.abs().max() > 1.0, "logits too small to tell tokens apart"
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_greedy_tokens_match(variant):
    name, hf, ckpt_dir = variant
    model = load(ckpt_dir)
    prompt = torch.tensor([3, 17, 42, 7, 99], dtype=torch.int)
    with torch.no_grad():
        ref = hf.generate(prompt[None].long(), max_new_tokens=20, do_sample=False, min_new_tokens=20,
                          pad_token_id=0)[0].tolist()
        model.setup_caches(1, 32)
        y, _ = generate(model, prompt, 20, temperature=0)
    assert y[0].tolist() == ref


def test_config_matches_hf(variant):
    name, hf, ckpt_dir = variant
    model = load(ckpt_dir)
    c = hf.config
    assert model.config.n_layer == c.num_hidden_layers
    assert model.config.vocab_size == c.vocab_size
    assert model.config.tie_word_embeddings == bool(c.tie_word_embeddings)
    assert model.config.qkv_bias == (name in ("qwen1", "qwen2", "qwen2_tied"))
    assert model.config.qk_norm == (name == "qwen3")
    if name == "llama3":
        assert model.config.rope_scaling["factor"] == 8.0
