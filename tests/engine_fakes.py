"""Graph mode on the CPU for engine tests: 'capture' runs the step body twice (the warm-up), 'replay'
runs it again — the captured-body path (tensor step index, static buffers) without a GPU."""


def fake_graph_mode(eng, monkeypatch):
    import ursa_engine.graphs as graphs

    def fake_capture(fn, pool):
        fn()
        fn()
        return fn

    monkeypatch.setattr(graphs, "cuda_graph_capture", fake_capture)
    monkeypatch.setattr(eng, "_resolve_mode", lambda mode, sched: "graph")
