"""Where plugins act in the training loop.

The loop, with every event in its place (dataflex.session.flex.DataFlex runs exactly this)::

    fire(FIT_START)                  plugins learn the domains; mixers publish initial weights
    for step in steps:
        fire(BEFORE_SAMPLE)          mixers: state.domain_weights for this step's draw
        the sampler takes the new weights and any state.pool_masks set since the last draw
        candidates = sampler.draw(global_batch * candidate_factor)
        fire(AFTER_CANDIDATES)       selectors: state.keep_mask over the candidates (may probe them)
        batch = this rank's slice of the kept candidates (a selector acts first: only kept samples
                are weighted)
        per_sample_loss = forward(batch); gathered across ranks into state.losses (and per-token
                                     losses into state.token_losses when a plugin needs them)
        fire(AFTER_LOSS)             reweighters: state.sample_weights (mean 1 over the global batch)
                                     or state.token_weights
        weight of sample i, token t = domain_loss_weights[domain_i]   (a mixer with apply=loss)
                                    x sample_weights[i]              (a reweighter)
                                    x 0 if the loss of i is not finite
                                    x token_weights[i, t]            (a token-level reweighter)
        backward(the weighted token or sample mean, normalised by the weights' total); optimizer step
        fire(BATCH_END)              mixers update from the step's losses and domains
        every eval_every steps:
            state.val_loss = per-domain validation loss
            fire(EVAL_END)           mixers driven by validation loss update
    fire(FIT_END)                    DataFlex.finish(): plugins export files (DoReMi's mixture.json)

Every rank fires every event with the same state, so every rank takes the same decisions.
"""
from enum import Enum


class Event(str, Enum):
    FIT_START = "fit_start"
    BEFORE_SAMPLE = "before_sample"
    AFTER_CANDIDATES = "after_candidates"
    AFTER_LOSS = "after_loss"
    BATCH_END = "batch_end"
    EVAL_END = "eval_end"
    FIT_END = "fit_end"
