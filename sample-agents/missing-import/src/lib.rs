//! Missing-import agent: exports `run` like an agent but imports an
//! interface no node provides (`nope:missing/thing`).
//!
//! Attacks the node's linking: the node must refuse the component when it
//! loads it, as `agent.invalid` naming the import, rather than instantiate
//! it or trap in the middle of a run.

wit_bindgen::generate!({
    inline: r"
        package nope:missing;

        interface thing {
            poke: func() -> string;
        }

        world needs-thing {
            import thing;
            export run: func() -> string;
        }
    ",
});

struct MissingImport;

impl Guest for MissingImport {
    fn run() -> String {
        // Calling the import keeps it in the component.
        nope::missing::thing::poke()
    }
}

export!(MissingImport);
