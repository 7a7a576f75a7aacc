import numpy as np

from captioner.vocabulary import END, PAD, SPECIAL_TOKENS, START, UNK, Vocabulary, normalize_caption


def test_normalize_lowercases_and_keeps_only_alphabetic_words():
    assert normalize_caption("A dog's ball, 2 times!  Tri-colored DOG.") == ["a", "dogs", "ball", "times", "tri", "colored", "dog"]
    assert normalize_caption("") == []
    assert normalize_caption("123 ... !!") == []


def test_special_tokens_come_first_and_pad_is_zero():
    vocab = Vocabulary(["dog", "cat"])
    assert vocab.itos[:4] == list(SPECIAL_TOKENS)
    assert (vocab.pad_id, vocab.stoi[PAD]) == (0, 0)
    assert set(vocab.forbidden_ids) == {vocab.stoi[PAD], vocab.stoi[START], vocab.stoi[UNK]}
    assert vocab.stoi[END] not in vocab.forbidden_ids


def test_the_allowed_tokens_are_one_rule_for_every_position():
    vocab = Vocabulary(["dog", "cat"])
    never = [vocab.pad_id, vocab.start_id, vocab.unk_id]
    later, first = vocab.allowed_tokens(), vocab.allowed_tokens(first=True)
    assert later.shape == (len(vocab),) and not later[never].any() and later[vocab.end_id] and later[4:].all()
    assert np.flatnonzero(first != later).tolist() == [vocab.end_id]  # <end> never first: no empty caption
    assert not later.flags.writeable  # shared by every caller: nobody may change it


def test_encode_decode_round_trip(tmp_path):
    vocab = Vocabulary(["a", "dog", "runs"])
    ids = vocab.encode("A dog runs!")
    assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id
    assert vocab.decode(ids) == "a dog runs"
    assert vocab.encode("a zebra runs", add_special=False) == [vocab.stoi["a"], vocab.unk_id, vocab.stoi["runs"]]
    # decoding stops at <end> and drops special tokens
    assert vocab.decode([vocab.start_id, vocab.stoi["dog"], vocab.end_id, vocab.stoi["runs"]]) == "dog"

    vocab.save(tmp_path / "vocab.json")
    loaded = Vocabulary.load(tmp_path / "vocab.json")
    assert loaded.itos == vocab.itos


def test_vocabulary_rule_keeps_words_seen_more_than_min_count():
    captions = ["a dog"] * 11 + ["a cat"] * 10 + ["the bird"]
    vocab = Vocabulary.from_captions(captions, min_count=10)
    words = vocab.itos[len(SPECIAL_TOKENS) :]
    assert words == ["a", "dog"]  # "cat" is seen exactly 10 times: not more than 10
    assert Vocabulary.from_captions(captions, min_count=0).itos[len(SPECIAL_TOKENS)] == "a"  # most frequent first
