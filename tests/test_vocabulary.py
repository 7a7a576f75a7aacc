import numpy as np

from captioner.vocabulary import END, PAD, SPECIAL_TOKENS, START, UNK, Vocabulary, never_final_words, normalize_caption


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


def test_the_words_no_caption_ends_on_are_those_training_captions_almost_never_end_on(tmp_path):
    """A word that ends under 1% of the captions it is in (of those seen in 20 or more) may not end a caption."""
    captions = ["a dog runs on the grass"] * 150 + ["a dog on the grass runs"] * 49 + ["the dog runs on a"]
    assert never_final_words(captions, ["a", "dog", "runs", "on", "the", "grass"]) == ["a", "dog", "on", "the"]
    # "a" ends 1 of the 200 captions it is in (0.5%); "runs" 49 and "grass" 150; "cat" is never seen: free.
    assert never_final_words(captions[:19] + ["a"], ["a", "dog"]) == []  # 20 captions with "a", one ending on it: 5%
    vocab = Vocabulary(["a", "dog", "the", "grass"], never_final=["a", "the", "zebra"])
    assert vocab.never_final == {"a", "the"}  # words the vocabulary lacks are left out
    assert np.flatnonzero(vocab.never_final_ids).tolist() == [vocab.stoi["a"], vocab.stoi["the"]]
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json").never_final == {"a", "the"}
    Vocabulary(["a", "dog"]).save(tmp_path / "old.json")  # a folder written before the rule: none
    assert Vocabulary.load(tmp_path / "old.json").never_final == frozenset()
