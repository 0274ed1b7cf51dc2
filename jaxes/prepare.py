"""The data CLI: ``python -m jaxes.data prepare NAME --data_dir=DIR`` (or ``python -m
jaxes.prepare``): prepares a data set once, so that runs only read it."""

from __future__ import annotations

import sys

import tensorflow_datasets as tfds
from absl import logging as absl_logging

from jaxes import cli
from jaxes import digits as digits_lib
from jaxes import folder as folder_lib
from jaxes import mnist5k as mnist5k_lib
from jaxes.data import (
    FOLDER,
    LOCAL,
    PREPARE_EXTRA,
    SPLITS,
    DataError,
    default_data_dir,
    describe_known,
    load,
)


def main(argv: list[str] | None = None) -> int:
    """Prepares a data set: `python -m jaxes.data prepare NAME --data_dir=DIR`.

    NAME is digits, mnist5k, folder (with --path=DIR) or a TFDS name. Exit codes: 0 prepared;
    2 misuse (unknown name, unwritable dir, not an image data set, a missing extra); 1 the
    environment could not prepare a known data set (no network, a broken download).
    """
    parser = cli.Parser(prog="python -m jaxes.data", description=main.__doc__.split("\n")[0])
    parser.add_argument("command", choices=("prepare",))
    parser.add_argument("name", help=f"one of {sorted(LOCAL)} or a TFDS dataset name")
    parser.add_argument("--data_dir", default=default_data_dir(), help="default: %(default)s")
    parser.add_argument("--path", default="", help="the image folder, for NAME=folder")
    args = parser.parse_args(argv)
    absl_logging.set_verbosity(absl_logging.ERROR)  # TFDS's routine warnings are not the outcome
    folder = folder_lib.Options(path=args.path) if args.name == FOLDER else None
    try:
        if args.name not in LOCAL and args.name not in (
            digits_lib.JaxesDigits.name,
            mnist5k_lib.JaxesMnist5k.name,
        ):
            try:
                builder = tfds.builder(
                    args.name, data_dir=args.data_dir, file_format="array_record"
                )
            except ValueError:
                cli.fail(f"TFDS has no dataset {args.name!r}: {describe_known()}.")
            builder.download_and_prepare(file_format="array_record")
        data = load(args.name, args.data_dir, folder=folder)
    except OSError as error:
        cli.fail(cli.describe_os_error(error))
    except DataError as error:  # prepared, but not an image classification data set
        cli.fail(str(error))
    except ImportError as error:  # TensorFlow and its helpers come with the prepare extra
        cli.fail(
            f"preparing {args.name!r} needs the prepare extra (no module "
            f"{getattr(error, 'name', None) or error}): install it with {PREPARE_EXTRA}."
        )
    except Exception as error:  # no network, a broken download
        print(
            f"jaxes: preparing {args.name!r} in {args.data_dir} failed "
            f"({type(error).__name__}: {str(error).partition(chr(10))[0]}); it needs "
            f"the prepare extra ({PREPARE_EXTRA}) and network access.",
            file=sys.stderr,
        )
        return 1
    split_sizes = {key: len(data.split(key)) for key in SPLITS}
    print(f"Prepared {args.name!r} in {args.data_dir}: {data.spec}, split sizes {split_sizes}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
