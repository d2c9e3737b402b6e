"""The reference TUF client (python-tuf's ngclient) against a posfleet
control plane: refresh from a pinned root, download one target, print the
path of the downloaded file. Any verification failure raises."""

import os
import sys
import tempfile

from tuf.ngclient import Updater


def main() -> None:
    repo_url, pinned_root, target = sys.argv[1], sys.argv[2], sys.argv[3]
    metadata_dir = tempfile.mkdtemp()
    target_dir = tempfile.mkdtemp()
    with open(pinned_root, "rb") as f:
        root = f.read()
    updater = Updater(
        metadata_dir=metadata_dir,
        metadata_base_url=repo_url.rstrip("/") + "/",
        target_base_url=repo_url.rstrip("/") + "/targets/",
        target_dir=target_dir,
        bootstrap=root,
    )
    updater.refresh()
    info = updater.get_targetinfo(target)
    if info is None:
        sys.exit(f"target {target} not found")
    print(updater.download_target(info, os.path.join(target_dir, "bundle")))


if __name__ == "__main__":
    main()
