"""The code's shape: no import cycle between the project's modules (lazy imports inside functions counted), no
function longer than 100 lines."""
import ast

from conftest import ROOT

MAX_FUNCTION_LINES = 100


def project_modules():
    """dict module name -> path of the project's own modules (top level and models/)."""
    mods = {p.stem: p for p in ROOT.glob('*.py')}
    mods['models'] = ROOT / 'models' / '__init__.py'
    mods.update({f'models.{p.stem}': p for p in (ROOT / 'models').glob('*.py') if p.stem != '__init__'})
    return mods


def imports_of(name, path, mods):
    """Project modules a module imports anywhere in its body (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import inside the models package
                found.add(f'models.{node.module}' if node.module else 'models')
                found |= {f'models.{a.name}' for a in node.names}
            elif node.module:
                found.add(node.module)
                found |= {f'{node.module}.{a.name}' for a in node.names}
    return {m for m in found if m in mods and m != name}


def find_cycle(graph):
    """One import cycle as a list of module names, or None."""
    state = {}

    def visit(node, stack):
        state[node] = 'open'
        for dep in sorted(graph[node]):
            if state.get(dep) == 'open':
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                cycle = visit(dep, stack + [dep])
                if cycle:
                    return cycle
        state[node] = 'done'
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [node])
            if cycle:
                return cycle
    return None


def test_find_cycle_detects_one():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_no_import_cycle():
    mods = project_modules()
    assert {'main', 'runtime', 'checkpoint', 'engine', 'datasets', 'preprocess_data', 'imaging', 'labels'} <= set(mods)
    graph = {name: imports_of(name, path, mods) for name, path in mods.items()}
    assert 'preprocess_data' in graph['datasets'] and 'labels' in graph['softLabelLoss']  # the scan sees imports
    assert find_cycle(graph) is None, f'import cycle: {" -> ".join(find_cycle(graph))}'


def test_no_long_function():
    long = []
    for path in [*ROOT.glob('*.py'), *(ROOT / 'models').glob('*.py')]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f'{path.name}:{node.name} ({lines} lines)')
    assert not long, long
