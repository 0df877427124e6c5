"""Build the pbc8 bench set (issue 20) from a local git copy of AuralinACC/Blood-Cell-Classification.

pbc8: microscope photos of single stained blood cells, 8 classes x 300, a seeded content-blind subset of the PBC
dataset (Acevedo et al., Data in Brief 30 (2020) 105474, CC BY 4.0), folder `PBC_dataset_normal_DIB/` of commit
d2e7b75e. Byte-identical files of the source are left out (all copies), so no two images of the set share bytes.
The pick is by SHA-256 of (seed, bytes) within each class: it does not look at what an image shows.

    python bench/make_pbc8.py GIT_DIR OUT [--per-class 300] [--seed 0]

GIT_DIR is a bare or normal git directory of that repository (e.g. what the session's fetch tool brings); OUT gets
one folder per class, a README.md and SHA256SUMS. Kept outside the repository: never commit the images.
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
from collections import defaultdict
from pathlib import Path

COMMIT = "d2e7b75e"
FOLDER = "PBC_dataset_normal_DIB"


def git(git_dir: Path, *args: str) -> bytes:
    return subprocess.run(["git", "--git-dir", str(git_dir), *args], check=True, capture_output=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("git_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} is not empty: give a new folder")
    listing = git(args.git_dir, "ls-tree", "-r", COMMIT, f"{FOLDER}/").decode().splitlines()
    blobs = []  # (class, name, blob id)
    for line in listing:
        meta, path = line.split("\t", 1)
        _, kind, blob = meta.split()
        parts = path.split("/")
        if kind == "blob" and len(parts) == 3 and parts[2].lower().endswith((".jpg", ".jpeg", ".png")):
            blobs.append((parts[1], parts[2], blob))
    copies = defaultdict(int)  # git's blob id is a hash of the bytes: equal ids are byte-identical files
    for _, _, blob in blobs:
        copies[blob] += 1
    per_class = defaultdict(list)
    for cls, name, blob in blobs:
        if copies[blob] == 1:
            per_class[cls].append((hashlib.sha256(f"{args.seed}:{blob}".encode()).hexdigest(), name, blob))
    dropped = sum(n for n in copies.values() if n > 1)
    sums = []
    for cls in sorted(per_class):
        picked = sorted(per_class[cls])[: args.per_class]
        if len(picked) < args.per_class:
            raise SystemExit(f"class {cls} has only {len(picked)} distinct images")
        folder = args.out / cls
        folder.mkdir(parents=True)
        for _, name, blob in picked:
            data = git(args.git_dir, "cat-file", "blob", blob)
            (folder / name).write_bytes(data)
            sums.append(f"{hashlib.sha256(data).hexdigest()}  {cls}/{name}")
    (args.out / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    (args.out / "README.md").write_text(
        f"# pbc8\n\n{len(per_class)} classes x {args.per_class} microscope photos of single blood cells, a seeded "
        f"(seed {args.seed}) content-blind subset of the PBC dataset (Acevedo et al., Data in Brief 30 (2020) "
        f"105474, CC BY 4.0), from AuralinACC/Blood-Cell-Classification@{COMMIT}, folder {FOLDER}/. "
        f"{dropped} files that are byte-identical to another were left out. Built by tlearn's bench/make_pbc8.py.\n")
    print(f"{args.out}: {len(sums)} images in {len(per_class)} classes ({dropped} duplicate files left out)")


if __name__ == "__main__":
    main()
