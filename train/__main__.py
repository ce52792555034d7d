from shards.config import load_config, run_cli

from .config import TrainConfig


def main(argv):
    cfg = load_config(TrainConfig, argv)
    from .loop import summary, train  # heavy imports only after the config is known to be good

    print(summary(train(cfg)))


if __name__ == "__main__":
    run_cli("train", main, schema=TrainConfig)
