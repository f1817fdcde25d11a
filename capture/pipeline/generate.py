"""Generate, then capture: one model continues every prompt before the passes run over prompt + response.

transformers' own ``generate`` does the decoding (KV cache, each architecture's positions under left
padding); resdiff batches prompts of similar length, stops each at the model's end-of-turn or EOS token,
draws sampled tokens from per-prompt generators, and journals each batch so a killed run never generates a
prompt twice.

Legend: ``ids_bt`` token ids (batch, tokens), ``mask_bt`` their attention mask, ``scores_bv`` next-token
scores (batch, vocabulary).
"""

from __future__ import annotations

import weakref

import torch

from capture.inputs.responses import Generation, Journal, Response, budget
from store.errors import UsageError


def stop_ids(model, tokenizer) -> list[int]:
    """The tokens that end a response: the model's generation EOS ids (end-of-turn tokens of chat models
    included) and the tokenizer's EOS."""
    found: set[int] = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, tokenizer.eos_token_id):
        if value is not None:
            found.update([value] if isinstance(value, int) else value)
    return sorted(found)


def generation_batches(lengths: list[int], batch_size: int, batch_tokens: int, new_tokens: int,
                       context: int | None = None) -> list[list[int]]:
    """Rows batched longest first, so a batch holds prompts of similar length; a batch's padded prompt and
    response tokens stay within ``batch_tokens`` (a longer prompt runs alone). A prompt too close to the
    ``context`` length for ``new_tokens`` runs alone too, so that every prompt gets its own room, whatever
    its batch.

    >>> generation_batches([3, 9, 4, 8], 2, 100, 4)
    [[1, 3], [2, 0]]
    >>> generation_batches([3, 9, 4, 8], 2, 100, 4, context=12)
    [[1], [3, 2], [0]]
    """
    order = sorted(range(len(lengths)), key=lambda r: (-lengths[r], r))
    batches: list[list[int]] = []
    for row in order:
        last = batches[-1] if batches else None
        width = (lengths[last[0]] if last else 0) + new_tokens
        roomy = budget(lengths[row], new_tokens, context) == new_tokens
        if last and roomy and len(last) < batch_size and width * (len(last) + 1) <= batch_tokens and \
                budget(lengths[last[0]], new_tokens, context) == new_tokens:
            last.append(row)
        else:
            batches.append([row])
    return batches


class SeededSampler:
    """A logits processor that samples each row from its own generator at ``temperature``; the decoding
    itself stays greedy, so the sampled token is the one kept (rows never share random draws)."""

    def __init__(self, seeds: list[int], temperature: float, device) -> None:
        self.temperature = temperature
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, ids_bt: torch.Tensor, scores_bv: torch.Tensor) -> torch.Tensor:
        probs_bv = torch.softmax(scores_bv.float() / self.temperature, dim=-1)
        chosen = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs_bv, self.generators,
                                                                                  strict=True)])
        out_bv = torch.full_like(scores_bv, float("-inf"))
        return out_bv.scatter_(1, chosen[:, None], 0.0)


def prompt_seed(seed: int, label: int) -> int:
    """The generator seed of the prompt at source position ``label``."""
    return (seed * 1_000_003 + label) % (2**63)


def generate_batch(model, prompts: list[list[int]], labels: list[int], generation: Generation, stops: list[int],
                   pad_id: int, context: int | None) -> dict[int, Response]:
    """Continue ``prompts`` (one batch, left-padded) and return each one's response by label."""
    from transformers import GenerationConfig, LogitsProcessorList

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids_bt = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask_bt = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        ids_bt[row, width - len(ids):] = torch.tensor(ids)
        mask_bt[row, width - len(ids):] = 1
    limits = [budget(len(p), generation.new_tokens, context) for p in prompts]
    new = budget(width, generation.new_tokens, context)  # room for the longest prompt
    if new < 1:
        return {label: Response([], "context") for label in labels}
    config = GenerationConfig(max_new_tokens=new, do_sample=False, num_beams=1, eos_token_id=stops or None,
                              pad_token_id=pad_id, temperature=None, top_k=None, top_p=None)
    processors = LogitsProcessorList()
    if generation.sampling:
        seeds = [prompt_seed(generation.seed or 0, label) for label in labels]
        processors.append(SeededSampler(seeds, generation.temperature, device))
    with torch.inference_mode():
        out_bt = model.generate(input_ids=ids_bt.to(device), attention_mask=mask_bt.to(device),
                                generation_config=config, logits_processor=processors)
    found = {}
    for row, label in enumerate(labels):
        cap = min(new, limits[row])  # (generation_batches gives a prompt short of room a batch of its own)
        written = out_bt[row, width: width + cap].tolist()
        end = next((i for i, t in enumerate(written) if t in stops), None)
        if end is not None:
            found[label] = Response(written[: end + 1], "eos")
        else:
            found[label] = Response(written, "length" if cap == generation.new_tokens else "context")
    return found


def generate_responses(prep, journal: Journal, log, progress: bool) -> dict[int, Response]:
    """Every prompt's response: those in ``journal``, then the rest generated in batches (each journaled)."""
    from tqdm.auto import tqdm

    from capture.models.loading import load_model, release_memory
    from capture.plan.prepare import pad_id_of

    settings, generation, tokenized = prep.settings, prep.generation, prep.source
    found = journal.load()
    todo = [r for r in range(len(tokenized.ids)) if tokenized.label(r) not in found]
    if found:
        log(f"{len(found)} responses found from an earlier run ({journal.folder}); generating the other {len(todo)}")
    if not todo:
        return found
    ref = prep.refs[generation.model]
    model = load_model(ref, prep.resolved.dtype, prep.resolved.device, settings.device_map,
                       settings.trust_remote_code, **settings.load_kwargs())
    stops = stop_ids(model, prep.tokenizer)
    if not stops:
        log(f"the {generation.model} model and the tokenizer name no EOS token: every response runs to "
            f"{generation.new_tokens} tokens")
    lengths = [len(tokenized.ids[r]) for r in todo]
    context = prep.shapes[generation.model].max_positions
    batches = generation_batches(lengths, settings.batch_size_for(prep.resolved.device), settings.batch_tokens,
                                 generation.new_tokens, context)
    bar = tqdm(total=len(todo), unit="prompt", desc=f"generate ({generation.model})", disable=not progress)
    try:
        for batch in batches:
            rows = [todo[i] for i in batch]
            labels = [tokenized.label(r) for r in rows]
            done = generate_batch(model, [tokenized.ids[r] for r in rows], labels, generation, stops,
                                  pad_id_of(prep.tokenizer), context)
            journal.add(done)
            found.update(done)
            bar.update(len(rows))
    except torch.OutOfMemoryError:
        raise UsageError("generation ran out of device memory; lower --batch-size or --batch-tokens and rerun "
                         "(the responses generated so far are kept)") from None
    finally:
        bar.close()
        model_ref = weakref.ref(model)
        del model
        release_memory(model_ref)
    return found
