"""Full-parameter SFT of MiniMind with TRL's SFTTrainer (MiniMind's `train_full_sft.py`, the HF way).

    python recipes/sft.py --config recipes/sft.yaml
    torchrun --nproc_per_node 2 recipes/sft.py --config recipes/sft.yaml --learning_rate 1e-6

Every key of the YAML (and of `--key value` on the command line) belongs to `MiniMindArguments`
(minimind_hf/training.py) or to TRL's `SFTConfig`. All input is checked before any work starts.
"""

from datasets import Dataset
from transformers import PreTrainedTokenizerBase
from trl import SFTConfig

from minimind_hf.data import load_sft_tokenized
from minimind_hf.training import MiniMindArguments, Stage, run_cli, run_recipe


def load_datasets(
    args: MiniMindArguments, training_args: SFTConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[Dataset, Dataset | None]:
    """Conversations tokenized once, as TRL would (chat template, assistant-only mask, cut to `max_length`), by
    `dataset_num_proc` processes; `SFTTrainer` takes them as processed and only packs them. A conversation with no
    supervised token within `max_length` is dropped and named in the log (`error_on_unsupervised` to refuse it)."""

    def load(paths):
        return load_sft_tokenized(
            paths,
            tokenizer,
            training_args.max_length,
            skip_invalid=args.skip_invalid,
            error_on_unsupervised=args.error_on_unsupervised,
            num_proc=training_args.dataset_num_proc,
            assistant_only_loss=training_args.assistant_only_loss,
        )

    loaded = load(args.data_path), load(args.eval_data_path) if args.eval_data_path else None
    # The labels now carry the assistant-only mask; TRL applies `assistant_only_loss` only to conversations it
    # tokenizes itself, and refuses the key for tokenized rows.
    training_args.assistant_only_loss = False
    return loaded


SFT = Stage(name="sft", load_datasets=load_datasets, defaults={"assistant_only_loss": True})


def main(argv: list[str] | None = None, **hooks):
    """`hooks`: `callbacks` and `before_train`, as `run_recipe` takes them."""
    return run_recipe(SFT, argv, **hooks)


if __name__ == "__main__":
    run_cli(main)
