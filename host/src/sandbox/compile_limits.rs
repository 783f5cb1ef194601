//! The bounds on what the node agrees to compile.
//!
//! wasmtime cannot cancel a compilation once it has started, and a
//! component's compile time and memory grow with its code, not with its
//! file size alone: a few hundred kilobytes of tiny functions, or one
//! function of deeply nested blocks, keep Cranelift busy for as long as
//! the artifact's author likes, on a thread the lease's deadline cannot
//! stop. So the `.wasm` is read first, with wasmparser (wasmtime's own
//! parser, the same version), and refused `agent.invalid` before
//! anything is compiled when it is larger than [`CompileLimits`] allows:
//! its size in bytes, its number of function bodies (all core modules of
//! the component together), the size of its largest function body, and
//! how deeply its blocks, loops and ifs nest. Each refusal names the
//! bound and the setting that raises it. The read is one pass over the
//! code, about as fast as reading the file.
//!
//! A `.cwasm` is not compiled (it is loaded), so none of this applies to
//! it: it comes only from the operator.

use wasmparser::{Operator, Parser, Payload};

use super::agent::InvalidAgent;

/// How much code the node compiles for one component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompileLimits {
    /// The largest `.wasm` compiled, in bytes (`Sandbox.MaxComponentBytes`).
    pub max_bytes: u64,
    /// The most function bodies, summed over the component's core modules
    /// (`Sandbox.MaxFunctions`).
    pub max_functions: u32,
    /// The largest single function body, in bytes
    /// (`Sandbox.MaxFunctionBytes`).
    pub max_function_bytes: u32,
    /// The deepest nesting of blocks, loops and ifs in one function
    /// (`Sandbox.MaxNesting`).
    pub max_nesting: u32,
}

impl Default for CompileLimits {
    /// Several times what the largest agents measured need: the 18 MB
    /// Python component (componentize-py) has 13,481 functions, the
    /// largest 427 KB, nested 781 deep; the 12 MB JavaScript one 12,805,
    /// 172 KB, 456 deep.
    fn default() -> Self {
        CompileLimits {
            max_bytes: 64 << 20,
            max_functions: 100_000,
            max_function_bytes: 2 << 20,
            max_nesting: 4_000,
        }
    }
}

/// What was read of a component's code, as far as the check went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CodeShape {
    pub functions: u32,
    pub largest_function_bytes: u32,
    pub deepest_nesting: u32,
}

impl CompileLimits {
    /// Refuses `wasm` if it is larger than these limits allow, before
    /// anything compiles it. An artifact wasmparser cannot read is left to
    /// the compiler, which says what is wrong with it.
    pub fn check(&self, wasm: &[u8]) -> Result<CodeShape, InvalidAgent> {
        if wasm.len() as u64 > self.max_bytes {
            return Err(InvalidAgent(format!(
                "the component is {} bytes, more than the {} this node compiles \
                 (Sandbox.MaxComponentBytes); raise it if the agent is meant to be this large",
                wasm.len(),
                self.max_bytes
            )));
        }
        let mut shape = CodeShape::default();
        for payload in Parser::new(0).parse_all(wasm) {
            let Ok(payload) = payload else {
                return Ok(shape);
            };
            let Payload::CodeSectionEntry(body) = payload else {
                continue;
            };
            shape.functions += 1;
            if shape.functions > self.max_functions {
                return Err(InvalidAgent(format!(
                    "the component has more than {} functions, the most this node compiles \
                     (Sandbox.MaxFunctions); raise it if the agent is meant to be this large",
                    self.max_functions
                )));
            }
            let bytes = u32::try_from(body.range().len()).unwrap_or(u32::MAX);
            shape.largest_function_bytes = shape.largest_function_bytes.max(bytes);
            if bytes > self.max_function_bytes {
                return Err(InvalidAgent(format!(
                    "function {} of the component is {bytes} bytes of code, more than the {} this \
                     node compiles in one function (Sandbox.MaxFunctionBytes); raise it if the \
                     agent is meant to be this large",
                    shape.functions - 1,
                    self.max_function_bytes
                )));
            }
            let Ok(operators) = body.get_operators_reader() else {
                return Ok(shape);
            };
            let mut depth: u32 = 0;
            for operator in operators {
                let Ok(operator) = operator else {
                    return Ok(shape);
                };
                match operator {
                    Operator::Block { .. }
                    | Operator::Loop { .. }
                    | Operator::If { .. }
                    | Operator::Try { .. }
                    | Operator::TryTable { .. } => {
                        depth += 1;
                        shape.deepest_nesting = shape.deepest_nesting.max(depth);
                        if depth > self.max_nesting {
                            return Err(InvalidAgent(format!(
                                "function {} of the component nests blocks more than {} deep, \
                                 the most this node compiles (Sandbox.MaxNesting); raise it if \
                                 the agent is meant to be this deep",
                                shape.functions - 1,
                                self.max_nesting
                            )));
                        }
                    }
                    Operator::End => depth = depth.saturating_sub(1),
                    _ => {}
                }
            }
        }
        Ok(shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A core module of `functions` bodies, each `blocks` nested blocks
    /// deep, inside a component.
    pub(crate) fn component(functions: u32, blocks: u32) -> Vec<u8> {
        fn leb(mut n: u32, out: &mut Vec<u8>) {
            loop {
                let byte = (n & 0x7f) as u8;
                n >>= 7;
                if n == 0 {
                    out.push(byte);
                    return;
                }
                out.push(byte | 0x80);
            }
        }
        fn section(id: u8, body: &[u8], out: &mut Vec<u8>) {
            out.push(id);
            leb(body.len() as u32, out);
            out.extend_from_slice(body);
        }
        let mut body = vec![0]; // no locals
        for _ in 0..blocks {
            body.extend_from_slice(&[0x02, 0x40]);
        }
        body.extend(std::iter::repeat_n(0x0b, blocks as usize + 1));
        let mut module = b"\0asm\x01\0\0\0".to_vec();
        section(1, &[1, 0x60, 0, 0], &mut module);
        let mut funcs = Vec::new();
        leb(functions, &mut funcs);
        funcs.extend(std::iter::repeat_n(0, functions as usize));
        section(3, &funcs, &mut module);
        let mut code = Vec::new();
        leb(functions, &mut code);
        for _ in 0..functions {
            leb(body.len() as u32, &mut code);
            code.extend_from_slice(&body);
        }
        section(10, &code, &mut module);
        let mut component = b"\0asm\x0d\0\x01\0".to_vec();
        section(1, &module, &mut component);
        component
    }

    #[test]
    fn a_component_within_the_limits_is_measured() {
        let shape = CompileLimits::default().check(&component(10, 3)).unwrap();
        assert_eq!(
            shape,
            CodeShape {
                functions: 10,
                largest_function_bytes: 11,
                deepest_nesting: 3
            }
        );
    }

    #[test]
    fn each_bound_refuses_naming_its_setting() {
        let limits = CompileLimits {
            max_bytes: 10_000,
            max_functions: 100,
            max_function_bytes: 200,
            max_nesting: 50,
        };
        let refused = |wasm: Vec<u8>| limits.check(&wasm).unwrap_err().0;
        assert!(refused(component(3000, 0)).contains("Sandbox.MaxComponentBytes"));
        let functions = refused(component(101, 0));
        assert!(
            functions.contains("more than 100 functions") && functions.contains("(Sandbox.MaxFunctions)"),
            "{functions}"
        );
        assert!(refused(component(1, 120)).contains("Sandbox.MaxFunctionBytes"));
        assert!(refused(component(1, 51)).contains("more than 50 deep"));
        assert!(limits.check(&component(50, 50)).is_ok());
    }

    #[test]
    fn what_wasmparser_cannot_read_is_left_to_the_compiler() {
        let mut cut = component(10, 3);
        cut.truncate(cut.len() - 5);
        assert!(CompileLimits::default().check(&cut).is_ok());
    }
}
