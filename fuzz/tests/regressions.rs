//! Every seed, corpus file and saved finding of every fuzz target runs
//! without a panic and in time: findings become regression tests here.

#[test]
fn every_saved_input_runs_cleanly() {
    std::panic::set_hook(Box::new(|_| {}));
    let mut failures = Vec::new();
    let mut n = 0;
    for t in bh_fuzz::targets() {
        for input in bh_fuzz::all_seeds(&t) {
            n += 1;
            match bh_fuzz::run_one(&t, &input) {
                None => {}
                Some(bh_fuzz::Finding::Panic(m)) => failures.push(format!("{}: panic: {m} ({} bytes)", t.name, input.len())),
                Some(bh_fuzz::Finding::Slow(d)) => failures.push(format!("{}: took {d:?} ({} bytes)", t.name, input.len())),
            }
        }
    }
    let _ = std::panic::take_hook();
    assert!(n >= bh_fuzz::targets().len(), "every target has inputs");
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn the_mutator_is_deterministic_and_bounded() {
    let mut a = bh_fuzz::Rng::new(7);
    let mut b = bh_fuzz::Rng::new(7);
    let seed = b"nix-archive-1".to_vec();
    for _ in 0..1000 {
        let (x, y) = (bh_fuzz::mutate(&seed, &seed, &mut a), bh_fuzz::mutate(&seed, &seed, &mut b));
        assert_eq!(x, y);
        assert!(x.len() <= bh_fuzz::MAX_INPUT);
    }
}

#[test]
fn a_panicking_or_slow_parser_is_a_finding() {
    std::panic::set_hook(Box::new(|_| {}));
    let boom = bh_fuzz::Target { name: "boom", run: |b| assert!(!b.contains(&b'!'), "found the bang"), seeds: Vec::new };
    assert!(bh_fuzz::run_one(&boom, b"quiet").is_none());
    assert!(matches!(bh_fuzz::run_one(&boom, b"loud!"), Some(bh_fuzz::Finding::Panic(m)) if m.contains("found the bang")));
    // The mutator reaches a one-byte bug from a seed without it.
    let mut rng = bh_fuzz::Rng::new(1);
    let found = (0..100_000).any(|_| bh_fuzz::run_one(&boom, &bh_fuzz::mutate(b"quiet", b"", &mut rng)).is_some());
    let _ = std::panic::take_hook();
    assert!(found);
}
