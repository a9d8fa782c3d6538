"""Data-pipeline and training throughput on the embedded default (CPU), with one side-by-side:

group_by_length start-up with our measured lengths versus transformers' own LengthGroupedSampler, which
encodes every example (decoding every image) to learn the lengths when the dataset is not a datasets.Dataset.

    python benchmarks/data_pipeline.py [--examples 800]
"""

from __future__ import annotations

import argparse
import resource
import time

from transformers.trainer_pt_utils import LengthGroupedSampler

from finetune.config import load_recipe
from finetune.data.collate import Collator
from finetune.data.dataset import build_dataset
from finetune.data.encode import ChatEncoder
from finetune.data.sampler import LengthGroupedSampler as MeasuredLengthSampler
from finetune.models import load_processor


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenes", type=int, default=200, help="synthetic scenes (4 VQA questions each)")
    args = parser.parse_args()
    recipe = load_recipe("demo/vqa", {"data.train": f"synthetic:vqa/train?n={args.scenes}"})
    processor = load_processor(recipe.model)
    encoder = ChatEncoder(processor, recipe.data.max_length)
    (dataset, _), check_s = timed(lambda: build_dataset(recipe.data.train, recipe.data, encoder, progress=False))
    n = len(dataset)
    collate = Collator(processor.tokenizer.pad_token_id)
    _, batch_s = timed(lambda: [collate([dataset[j] for j in range(i, min(i + 16, n))]) for i in range(0, n, 16)])
    _, ours_s = timed(lambda: list(MeasuredLengthSampler(dataset.lengths, 16)))
    _, theirs_s = timed(lambda: list(LengthGroupedSampler(16, dataset=dataset)))
    print(f"examples                         {n}")
    print(f"up-front check (encode all)      {check_s:8.2f} s  ({n / check_s:8.1f} ex/s)")
    print(f"encode + collate, batch 16       {batch_s:8.2f} s  ({n / batch_s:8.1f} ex/s)")
    print(f"group_by_length sampler, ours    {ours_s:8.4f} s  (lengths measured by the check)")
    print(f"group_by_length sampler, stock   {theirs_s:8.2f} s  (re-encodes every example)")
    print(f"peak RSS                         {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:8.0f} MiB")


if __name__ == "__main__":
    main()
