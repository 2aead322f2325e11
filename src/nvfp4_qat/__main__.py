"""``python -m nvfp4_qat``: the same command as the ``nvfp4-qat`` console script."""

from nvfp4_qat.cli import main

if __name__ == "__main__":
    main()
