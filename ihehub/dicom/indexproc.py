"""``python -m ihehub.dicom.indexproc FD FSYNC``: the index worker process (see `ihehub.dicom.indexwork`).

A module of its own so that ``-m`` does not re-execute ``indexwork``, which the package has already
imported (runpy warns about exactly that).
"""

from ihehub.dicom.indexwork import main

if __name__ == "__main__":
    main()
