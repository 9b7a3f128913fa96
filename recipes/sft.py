"""Full-parameter SFT of MiniMind with TRL's SFTTrainer (MiniMind's `train_full_sft.py`, the HF way).

    python recipes/sft.py --config recipes/sft.yaml
    torchrun --nproc_per_node 2 recipes/sft.py --config recipes/sft.yaml --learning_rate 1e-6

Every key of the YAML (and of `--key value` on the command line) belongs to `MiniMindArguments`
(minimind_hf/training.py) or to TRL's `SFTConfig`. All input is checked before any work starts.
"""

from minimind_hf.data import load_sft_dataset
from minimind_hf.tokenizer import load_tokenizer
from minimind_hf.training import (
    build_trainer,
    check_output_dir,
    configure_swanlab,
    load_model,
    parse_recipe,
    resolve_resume,
    save_final,
    tokenizer_path,
)


def main(argv: list[str] | None = None) -> None:
    args, training_args = parse_recipe(argv=argv, defaults={"assistant_only_loss": True})
    tokenizer = load_tokenizer(tokenizer_path(args))
    train_dataset = load_sft_dataset(
        args.data_path, skip_invalid=args.skip_invalid, tokenizer=tokenizer, max_length=training_args.max_length
    )
    eval_dataset = None
    if args.eval_data_path:
        eval_dataset = load_sft_dataset(
            args.eval_data_path,
            skip_invalid=args.skip_invalid,
            tokenizer=tokenizer,
            max_length=training_args.max_length,
        )
    model = load_model(args)
    resume_from = resolve_resume(training_args)
    check_output_dir(training_args.output_dir)
    configure_swanlab(args, resume_from)

    trainer = build_trainer(model, tokenizer, training_args, train_dataset, eval_dataset)
    trainer.train(resume_from_checkpoint=resume_from)
    save_final(trainer, args, tokenizer)


if __name__ == "__main__":
    main()
