import numpy as np
import torch

from token_distillation.alignment import PhraseMatcher, collate, expand, merge
from token_distillation.tokenization import NewToken


def _tokens():
    return [NewToken("a", (5, 6), 100), NewToken("b", (5, 6, 7), 101), NewToken("c", (8, 9), 102)]


def test_merge_longest_match_and_alignment():
    toks = _tokens()
    m = PhraseMatcher([t.subtoken_ids for t in toks])
    teacher = [1, 3, 5, 6, 7, 4, 5, 6, 8, 9]
    seq = merge(teacher, m, [t.token_id for t in toks])
    assert seq.student_ids.tolist() == [1, 3, 101, 4, 100, 102]
    # t* maps to the last subtoken t_k; other positions one-to-one
    assert seq.student_to_teacher.tolist() == [0, 1, 4, 5, 7, 9]
    assert seq.first_new == 2
    assert expand(seq.student_ids, toks).tolist() == teacher


def test_merge_without_occurrence_is_identity():
    m = PhraseMatcher([(5, 6)])
    seq = merge([1, 2, 3], m, [100])
    assert seq.student_ids.tolist() == [1, 2, 3] and seq.first_new == -1


def test_roundtrip_random_sequences():
    rng = np.random.default_rng(0)
    toks = _tokens()
    m = PhraseMatcher([t.subtoken_ids for t in toks])
    for _ in range(200):
        teacher = rng.integers(0, 12, size=rng.integers(1, 40)).tolist()
        seq = merge(teacher, m, [t.token_id for t in toks])
        assert expand(seq.student_ids, toks).tolist() == teacher
        # aligned teacher positions strictly increase and point at the phrase end for new tokens
        s2t = seq.student_to_teacher
        assert np.all(np.diff(s2t) > 0)
        for sp, tp in enumerate(s2t):
            sid = int(seq.student_ids[sp])
            if sid >= 100:
                tok = next(t for t in toks if t.token_id == sid)
                assert teacher[tp - len(tok.subtoken_ids) + 1: tp + 1] == list(tok.subtoken_ids)
            else:
                assert teacher[tp] == sid


def test_collate_masks_select_same_number_and_align():
    toks = _tokens()
    m = PhraseMatcher([t.subtoken_ids for t in toks])
    seqs = [merge(t, m, [x.token_id for x in toks]) for t in ([1, 5, 6, 2, 3], [1, 2, 8, 9, 5, 6, 7, 4, 4], [1, 2, 3])]
    b = collate(seqs, [0, 1, 0], pad_id=2)  # pad id equal to a real id: masks must not depend on it
    assert torch.equal(b.teacher_loss_mask.sum(1), b.student_loss_mask.sum(1))
    assert b.student_loss_mask[2].sum() == 0  # no new token -> no loss positions
    # first row: student [1, 100, 2, 3]; loss on positions 1..3 <-> teacher positions 2, 3, 4
    assert b.student_loss_mask[0].tolist()[:4] == [False, True, True, True]
    assert b.teacher_loss_mask[0].tolist() == [False, False, True, True, True] + [False] * 4
    assert b.student_attention.sum(1).tolist() == [4, 6, 3]
    assert b.teacher_attention.sum(1).tolist() == [5, 9, 3]
    # pad positions are never in a loss mask
    assert not (b.teacher_loss_mask & ~b.teacher_attention).any()
    assert not (b.student_loss_mask & ~b.student_attention).any()


def test_collate_from_start_covers_the_prefix():
    """With trained original rows (from_start) the positions before the first new token are loss
    positions too, paired one-to-one with the teacher's; rows without a new token still get none."""
    m = PhraseMatcher([(10, 11, 12)])
    seqs = [merge([1, 5, 10, 11, 12, 6, 7], m, [64]), merge([1, 5, 6], m, [64])]
    a, b = collate(seqs, [0, 0]), collate(seqs, [0, 0], from_start=True)
    assert a.student_loss_mask[0].tolist() == [False, False, True, True, True]
    assert b.student_loss_mask[0].tolist() == [True] * 5 and not b.student_loss_mask[1].any()
    assert b.teacher_loss_mask[0].tolist() == [True, True, False, False, True, True, True]
    assert int(b.teacher_loss_mask.sum()) == int(b.student_loss_mask.sum())
