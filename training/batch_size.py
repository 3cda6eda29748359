"""`--train_batch_size auto --max_memory_gb N`: for every bucket, the largest batch whose training peak, as the
--dry_run estimate simulates it (the real training step on fake tensors, training/memory_estimate.py), stays under
N GiB per process. In a bucket config, `auto` may stand in the batch-size column for some buckets only.
`--blocks_to_swap auto --max_memory_gb N`: the smallest number of swapped blocks (training/block_swap.py) whose
estimated peaks, every phase, stay under N GiB.

The peak grows linearly with the batch (activations and gradients of each sample; weights and optimizer states stay),
so two simulations (batch 1 and 2) predict the answer and a third confirms it: about three per bucket.
"""

import dataclasses
import logging
import math


logger = logging.getLogger("cogvideox_factory")

AUTO = "auto"


def component_configs(model):
    """(VAE config, T5 config) of the [model] section's pipeline: small files, no weights."""
    from transformers import AutoConfig

    from .models import Pretrained, read_config

    vae_config = read_config(Pretrained.of(model), "vae")
    text_encoder_config = AutoConfig.from_pretrained(model.pretrained_model_name_or_path, subfolder="text_encoder",
                                                     revision=model.revision, cache_dir=model.cache_dir)
    return vae_config, text_encoder_config


def largest_batch_under(limit, peak_of, most):
    """(batch, {batch: simulated peak}) for the largest batch in 1..most with peak_of(batch) <= limit, or (0, peaks)
    when not even a batch of 1 fits. The line through the simulated peaks predicts the next batch to try; a batch
    whose successor the line already puts over the limit is the answer (the peak never grows slower than linearly:
    activations per sample, plus attention that grows with them)."""
    peaks = {1: peak_of(1)}
    if peaks[1] > limit:
        return 0, peaks
    if most == 1:
        return 1, peaks
    peaks[2] = peak_of(2)
    if peaks[2] > limit:
        return 1, peaks
    slope = peaks[2] - peaks[1]
    low, high = 2, most + 1  # peak(low) fits; high: the smallest batch known not to (most + 1 when none is)
    guess = most if slope <= 0 else 1 + math.floor((limit - peaks[1]) / slope)
    while high - low > 1:
        if peaks[low] + slope > limit:  # the line puts low + 1 over the limit
            break
        batch = min(max(guess, low + 1), high - 1)
        peaks[batch] = peak_of(batch)
        if peaks[batch] <= limit:
            slope = max(slope, (peaks[batch] - peaks[low]) / (batch - low))
            low = batch
        else:
            high = batch
        guess = (low + high) // 2
    return low, peaks


def choose_batch_sizes(model, data, training, optimizer, lora, validation, memory, parallelism, transformer_config,
                       conditioning, mode, weight_dtype, counts, sizes):
    """`sizes` ({bucket: batch size or "auto"}) with every "auto" replaced, and {(bucket, batch): peak bytes} of the
    simulations made, under --max_memory_gb ([memory]); the flag sections are those the estimate simulates with.
    `counts`: samples per bucket (a batch never needs to be larger). UsageError, naming the bucket, when not even a
    batch of one fits."""
    from .args import UsageError
    from .memory_estimate import estimate_training

    if memory.max_memory_gb is None:
        raise UsageError("a batch size of auto (--train_batch_size auto, or in --bucket_config) needs --max_memory_gb N: "
                         "the accelerator memory each process may use")
    limit = memory.max_memory_gb * 2**30
    vae_config, text_encoder_config = component_configs(model)
    chosen, simulated, problems = dict(sizes), {}, []
    auto = sorted(bucket for bucket, size in sizes.items() if size == AUTO)
    logger.info("choosing the batch size of %d bucket(s) under %g GiB (about 3 memory simulations each)", len(auto),
                memory.max_memory_gb)
    for bucket in auto:
        def peak_of(batch, bucket=bucket):
            return estimate_training(data, dataclasses.replace(training, train_batch_size=batch), optimizer, lora,
                                     validation, memory, parallelism, transformer_config, vae_config,
                                     text_encoder_config, conditioning, mode, weight_dtype, bucket)["training_peak"]

        batch, peaks = largest_batch_under(limit, peak_of, counts[bucket])
        simulated.update({(bucket, b): peak for b, peak in peaks.items()})
        name = "x".join(map(str, bucket))
        if batch == 0:
            problems.append(f"bucket {name}: even a batch of 1 needs about {peaks[1] / 2**30:.3g} GiB, over "
                            f"--max_memory_gb {memory.max_memory_gb:g}; drop this bucket, or save memory "
                            "(--gradient_checkpointing, --offload_activations, --quantize_base fp8; docs/memory.md)")
            continue
        chosen[bucket] = batch
        logger.info("  bucket %s: batch %d (estimated training peak %.3g GiB; %d sample(s))", name, batch,
                    peaks[batch] / 2**30, counts[bucket])
    if problems:
        raise UsageError(problems)
    return chosen, simulated


def smallest_count_under(limit, peak_of, most, saved_per_block):
    """(count, {count: peak}) for the smallest count in 0..most with peak_of(count) <= limit, or (None, peaks) when
    even `most` does not fit. The peak falls by about `saved_per_block` per count: that guess is simulated first, then
    one count at a time until one fits and the one below it does not (so count - 1 is simulated too, unless 0 fits)."""
    peaks = {0: peak_of(0)}
    if peaks[0] <= limit:
        return 0, peaks
    count = min(most, max(1, math.ceil((peaks[0] - limit) / max(saved_per_block, 1))))
    while True:
        if count not in peaks:
            peaks[count] = peak_of(count)
        if peaks[count] <= limit:
            if peaks.get(count - 1, 0) > limit:
                return count, peaks
            count -= 1
        elif count >= most:
            return None, peaks
        elif peaks.get(count + 1, limit + 1) <= limit:
            return count + 1, peaks
        else:
            count += 1


def choose_blocks_to_swap(model, data, buckets, training, optimizer, lora, validation, memory, parallelism,
                          transformer_config, conditioning, mode, weight_dtype, bucket_counts, batch_sizes):
    """`--blocks_to_swap auto`: (the smallest count whose estimated peak, the largest of training, validation and
    final test, fits --max_memory_gb ([memory]), {count: simulated peak bytes}). UsageError when not even every block
    swapped fits. `bucket_counts`, `batch_sizes`: as memory_estimate.estimate_phases takes them."""
    from .args import UsageError
    from .block_swap import frozen_block_bytes
    from .memory_estimate import estimate_phases

    limit = memory.max_memory_gb * 2**30
    vae_config, text_encoder_config = component_configs(model)
    blocks = transformer_config["num_layers"]

    def peak_of(count):
        phases = estimate_phases(data, buckets, training, optimizer, lora, validation,
                                 dataclasses.replace(memory, blocks_to_swap=count), parallelism, transformer_config,
                                 vae_config, text_encoder_config, conditioning, mode, weight_dtype, bucket_counts,
                                 batch_sizes)
        return max(v for k, v in phases.items() if k in ("training", "validation", "final_test"))

    logger.info("choosing --blocks_to_swap under %g GiB (a few memory simulations)", memory.max_memory_gb)
    saved = frozen_block_bytes(transformer_config, mode, training, lora, memory, weight_dtype)
    count, peaks = smallest_count_under(limit, peak_of, blocks, saved)
    if count is None:
        raise UsageError(f"--blocks_to_swap auto: even all {blocks} blocks swapped need about "
                         f"{peaks[blocks] / 2**30:.3g} GiB, over --max_memory_gb {memory.max_memory_gb:g}; save "
                         "memory elsewhere too (--gradient_checkpointing, smaller buckets; docs/memory.md)")
    logger.info("  --blocks_to_swap %d of %d (estimated peak %.3g GiB%s)", count, blocks, peaks[count] / 2**30,
                f"; {count - 1} would need {peaks[count - 1] / 2**30:.3g} GiB" if count else "")
    return count, peaks
