"""The built-in tokenizer of untrained models: valid ids, deterministic, realistic lengths."""

from clap_ws.model.tokenizer import MAX_TOKENS, byte_level_tokenizer, tokenize

ROBERTA_VOCAB = 50265  # rows of the text tower's token embedding


def test_prompts_split_like_roberta_base():
    tok = byte_level_tokenizer()
    # roberta-base: <s> a Ġwarm Ġbell </s>  /  <s> bright Ġmetallic Ġsound </s>
    assert tok.convert_ids_to_tokens(tokenize(tok, ["a warm bell"])["input_ids"][0].tolist()) == \
        ["<s>", "a", "Ġwarm", "Ġbell", "</s>"]
    assert len(tokenize(tok, ["bright metallic sound"])["input_ids"][0]) == 5
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, 2)  # roberta-base's ids


def test_any_text_gets_valid_ids_padded_to_the_longest_and_truncated():
    tok = byte_level_tokenizer()
    texts = ["Zürich élan 🎵", "x", "aaaa " * 200]
    batch = tokenize(tok, texts)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == (3, MAX_TOKENS)
    assert int(ids.max()) < ROBERTA_VOCAB and int(ids.min()) >= 0
    assert mask[1].sum() == 3 and (ids[1, 3:] == tok.pad_token_id).all()
    assert "<unk>" not in tok.convert_ids_to_tokens(ids[0].tolist())  # byte-level: nothing is unknown


def test_built_the_same_every_time():
    assert byte_level_tokenizer().get_vocab() == byte_level_tokenizer().get_vocab()
    a = tokenize(byte_level_tokenizer(), ["a long sweeping synth pad"])["input_ids"]
    b = tokenize(byte_level_tokenizer(), ["a long sweeping synth pad"])["input_ids"]
    assert a.tolist() == b.tolist()
