"""`finetune train RECIPE [KEY=VALUE ...]` as the benchmark runs it: the real command line (finetune.cli.main),
with one addition, the measuring callback and collator wrapper of _measure.py passed to train()."""

from __future__ import annotations

import sys

from finetune.startup import skip_bitsandbytes_unless_needed

# What finetune.cli.main does first, done here before finetune.training (and with it peft) is imported below, so
# this process starts exactly as the command does: without bitsandbytes when the recipe is not 4-bit.
skip_bitsandbytes_unless_needed(sys.argv[1], sys.argv[2:])

from _measure import BenchCallback, CountingCollator, log

from finetune import training
from finetune.cli import main

callback = BenchCallback()
real_train, real_collator = training.train, training.Collator


def counting_collator(*args, **kwargs):
    callback.counter = CountingCollator(real_collator(*args, **kwargs))
    return callback.counter


def train_with_callback(recipe, overrides=None, callbacks=None, **kwargs):
    return real_train(recipe, overrides, callbacks=[*(callbacks or []), callback], **kwargs)


if __name__ == "__main__":
    training.train, training.Collator = train_with_callback, counting_collator
    log("finetune train " + " ".join(sys.argv[1:]))
    sys.exit(main(["train", *sys.argv[1:]]))
