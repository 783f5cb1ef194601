//! Other-world agent: a valid component of a different world.
//!
//! Exercises the node's check that a component is an agent: it exports
//! `greet` and no `run`, so the node must reject it with a clear error
//! instead of trapping.

wit_bindgen::generate!({
    inline: r"
        package sample:other;

        world greeter {
            export greet: func(name: string) -> string;
        }
    ",
});

struct Greeter;

impl Guest for Greeter {
    fn greet(name: String) -> String {
        format!("hello, {name}")
    }
}

export!(Greeter);
