PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install test lint bench demo clean

# torch is installed first and pinned only when missing: 2.13.0 is on local disk here (CPU build,
# seconds); a machine that already has a torch in pyproject's range (a CUDA build, say) keeps it.
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[dev]"

test:
	$(PYTHON) -m pytest

lint:
	$(PYTHON) -m ruff check .

bench:
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PYTHON) $$b || exit 1; done

demo:  # the README's short tour, command for command
	llm fetch builtin
	llm tokenize data/python-reference.txt ../shared/data/alpaca_en_demo.json
	llm params recipes/scifi.yaml
	llm scaling --params 140M
	llm pretrain recipes/tiny.yaml
	llm generate checkpoints/tiny "The list" --strategy beam --num-beams 4 --max-new-tokens 20
	llm finetune recipes/tiny-lora.yaml --merge
	llm generate checkpoints/tiny-lora --instruct "Give three tips for staying healthy."

clean:
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info
