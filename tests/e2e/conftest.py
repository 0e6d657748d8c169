import pytest

# The demos read data with worker processes; in tests one process is quicker and keeps the
# suite's two cores free.
IN_PROCESS_LOADERS = [
    f"{loader}.{key}"
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader")
    for key in ("num_workers=0", "persistent_workers=false")
]


@pytest.fixture(scope="session")
def in_process_loaders():
    return list(IN_PROCESS_LOADERS)
