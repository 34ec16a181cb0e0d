"""Table 9: what the experts of a trained MoE language model specialise in.

`expert_specialisation` routes the valid split's sentences through a trained `train.lm`
run's gate and reports, for a few experts, their share of positions, most frequent input
subwords and the contexts with their highest gate values. `valid_positions` (the MoE
layer's inputs at every real position) also serves `benchmarks.hierarchical_probe`.
"""

import collections
from typing import Dict, List, NamedTuple, Tuple

import keras
import numpy as np
import tensorflow as tf

from models.lm import LanguageModelConfig, build_language_model
from models.special_tokens import PAD_ID
from train.data import text as text_data
from train.serving.trained_model import TrainedModel, restore_trained_model


class ValidPositions(NamedTuple):
    """A trained MoE language model's MoE layer and what it reads at the real (not
    padding) positions of valid-split sentences."""

    moe: keras.layers.Layer
    tokenizer: object
    inputs: np.ndarray            # float32 [positions, model_dim]: the MoE's inputs
    tokens: np.ndarray            # int [positions]: the piece read at each position
    contexts: List[Tuple[np.ndarray, int]]  # (the sentence's ids, the position)


def restore_language_model(model_dir: str) -> TrainedModel:
    """The trained `train.lm` run in `model_dir`, at its latest checkpoint."""
    return restore_trained_model(model_dir, LanguageModelConfig, build_language_model)


def valid_positions(trained: TrainedModel, num_sentences: int) -> ValidPositions:
    """Runs the first `num_sentences` valid sentences of a trained language model's run
    up to its MoE layer. A position's MoE input is the first LSTM's residual output
    after reading that piece (models.lm's wiring)."""
    model, tokenizer, run_config, _ = trained
    moe_inputs = keras.Model(model.inputs, model.get_layer("lstm_1_residual").output)
    lines = text_data.clean_lines(text_data.load_text_splits(run_config["data"]).valid)
    ids = text_data.sentence_ids(lines.take(num_sentences), tokenizer,
                                 max_length=run_config["max_length"])
    inputs, tokens, contexts = [], [], []
    for batch in ids.padded_batch(64, padded_shapes=[None]):
        states = moe_inputs(batch, training=False).numpy()
        batch = batch.numpy()
        for row, sentence in enumerate(batch):
            for position in np.flatnonzero(sentence != PAD_ID):
                inputs.append(states[row, position])
                tokens.append(sentence[position])
                contexts.append((sentence, position))
    return ValidPositions(moe=model.get_layer("moe"), tokenizer=tokenizer,
                          inputs=np.array(inputs, np.float32), tokens=np.array(tokens),
                          contexts=contexts)


def expert_specialisation(model_dir: str, *, num_sentences: int = 1000,
                          experts_shown: int = 6, contexts_shown: int = 6,
                          context_pieces: int = 5) -> Dict:
    """Routes valid-split sentences through a trained MoE language model's gate.

    For `experts_shown` experts with evenly spaced ids: the share of positions routed to
    it, its most frequent input subwords, and the distinct contexts (the preceding pieces
    and the piece at the position, in brackets) with its highest gate values (see
    `valid_positions` for what a position's gate sees). Also, over all experts that
    receive >= 20 positions, the median share of an expert's positions taken by its most
    frequent subword, against the same share for the whole split.
    """
    positions = valid_positions(restore_language_model(model_dir), num_sentences)
    tokenizer, tokens, contexts = positions.tokenizer, positions.tokens, positions.contexts
    gates = positions.moe.gate_values(positions.inputs).numpy()
    pieces = [p.decode("utf-8") for p in
              tokenizer.tokenizer.id_to_string(tf.range(tokenizer.vocab_size)).numpy()]

    def text(piece_ids) -> str:
        return "".join(pieces[i] for i in piece_ids).replace("\u2581", " ").strip()

    def piece_text(piece_id) -> str:  # a lone word-start marker stays visible
        return text([piece_id]) or pieces[piece_id]

    routed = gates > 0
    counts = routed.sum(axis=0)
    overall_top_share = np.bincount(tokens).max() / len(tokens)
    top_shares = [np.bincount(tokens[routed[:, e]]).max() / counts[e]
                  for e in range(gates.shape[1]) if counts[e] >= 20]
    experts = []
    for expert in np.unique(np.linspace(0, gates.shape[1] - 1, experts_shown).round()
                            .astype(int)):
        mine = np.flatnonzero(routed[:, expert])
        frequent = collections.Counter(tokens[mine].tolist()).most_common(5)
        best = {}  # distinct context text -> its highest gate value, best first
        for i in mine[np.argsort(-gates[mine, expert])]:
            start = max(contexts[i][1] - context_pieces, 0)
            context = (text(contexts[i][0][start:contexts[i][1]])
                       + f" [{piece_text(tokens[i])}]").strip()
            best.setdefault(context, float(gates[i, expert]))
            if len(best) == contexts_shown:
                break
        experts.append({
            "expert": int(expert),
            "share_of_positions": float(counts[expert] / len(tokens)),
            "frequent_pieces": [[piece_text(piece), n] for piece, n in frequent],
            "top_contexts": [{"gate": gate, "context": context}
                             for context, gate in best.items()],
        })
    return {"model_dir": model_dir, "sentences": num_sentences,
            "positions": int(len(tokens)),
            "median_top_piece_share": float(np.median(top_shares)) if top_shares else None,
            "overall_top_piece_share": float(overall_top_share),
            "experts": experts}
