from shards.common.config import load_config, run_cli

from .config import TrainConfig


def main(argv):
    cfg = load_config(TrainConfig, argv)
    from .loop import train
    from .outputs import summary  # heavy imports only after the config is known to be good

    result = train(cfg)
    if "up_to_date" in result:
        if result["rank"] == 0:
            print(f"train: up to date: {cfg.out.dir} holds the finished run ({result['steps']} steps, "
                  f"{result['up_to_date']}); raise train.max_steps to train on, or set out.overwrite=true to redo it")
    elif "lora" in result or "transformer_dir" in result:  # the main process of a multi-process run reports
        print(summary(result))


def command(argv):
    run_cli("train", main, argv, schema=TrainConfig)


if __name__ == "__main__":
    import sys

    command(sys.argv[1:])
