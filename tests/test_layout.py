"""The layout rules of the code (issue 24): no script imports another script, modules stay small,
the engine is a package of one-job modules, and models/ and data/ import no training machinery."""
import ast

from conftest import REPO

ENTRY_FOLDERS = ('', 'tools', 'benchmarks')
LONGEST = 500  # lines; models/med.py (the BERT text model with its decoding cache) is the exception
ENGINE_LONGEST = 400


def python_files(folder):
    return sorted((REPO / folder).glob('*.py'))


def is_script(path):
    return "if __name__ == '__main__'" in path.read_text() or 'if __name__ == "__main__"' in path.read_text()


def imported_modules(path):
    """Every module name an import statement of the file names (top level and inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_script_imports_another_script():
    scripts = {path.stem: path for folder in ENTRY_FOLDERS for path in python_files(folder) if is_script(path)}
    assert {'train_retrieval', 'predict', 'demo', 'convert_hf', 'bench_gpu'} <= set(scripts)  # found them
    offenders = [f'{path.relative_to(REPO)} imports {name}'
                 for folder in ENTRY_FOLDERS for path in python_files(folder)
                 for name in sorted(imported_modules(path)) if name.split('.')[0] in scripts and name != path.stem]
    assert not offenders, offenders


def test_modules_stay_small():
    paths = [path for folder in ('', 'engine', 'models', 'data', 'tools', 'benchmarks') for path in python_files(folder)]
    long = {str(path.relative_to(REPO)): n for path in paths
            if (n := len(path.read_text().splitlines())) > LONGEST and path != REPO / 'models' / 'med.py'}
    assert not long, long


def test_the_engine_is_one_job_per_module():
    modules = [path for path in python_files('engine') if path.name != '__init__.py']
    assert len(modules) >= 8
    for path in modules:
        tree = ast.parse(path.read_text())
        doc = ast.get_docstring(tree)
        assert doc, f'{path.name} has no docstring saying its job'
        assert len(path.read_text().splitlines()) <= ENGINE_LONGEST, path.name
        assert not any(name.split('.')[0] in {'train_retrieval', 'train_caption', 'predict', 'capfilt'}
                       for name in imported_modules(path)), path.name


def test_models_and_data_import_no_training_machinery():
    allowed = {'models': {'engine.fileio'}, 'data': {'engine.fileio', 'engine.config'}}
    for folder, engine_modules in allowed.items():
        for path in python_files(folder):
            used = {name for name in imported_modules(path) if name == 'engine' or name.startswith('engine.')}
            assert used <= engine_modules, f'{path.relative_to(REPO)} imports {sorted(used - engine_modules)}'
