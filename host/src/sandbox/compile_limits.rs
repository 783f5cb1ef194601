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
//! the component together), the size of its largest function body, how
//! deeply its blocks, loops and ifs nest, and how many locals one function
//! and all functions together declare. Each refusal names the bound and
//! the setting that raises it. The read is one pass over the code, about
//! as fast as reading the file.
//!
//! Locals need their own bounds because they are run-length encoded: a
//! six-byte body can declare 50,000 of them (wasmparser's own limit per
//! function), and Cranelift zeroes every one on entry, so 100,000 such
//! bodies, 800 KB within every other bound, would take minutes and
//! hundreds of megabytes to compile. Parameters count as locals (as in
//! the WebAssembly specification): a function's type is shared, so 100,000
//! two-byte bodies of a 1,000-parameter type cost Cranelift about as much.
//! Other per-function quantities that
//! cost compile time (`br_table` targets, operands, `select` or
//! `call_indirect` chains) take at least a byte of the body each, so the
//! body-size and function-count bounds already cover them.
//!
//! A `.cwasm` is not compiled (it is loaded), so none of this applies to
//! it: it comes only from the operator.

use wasmparser::{CompositeInnerType, Encoding, Operator, Parser, Payload};

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
    /// The most locals of one function, its parameters included
    /// (`Sandbox.MaxFunctionLocals`).
    pub max_function_locals: u32,
    /// The most locals of all function bodies of the component together,
    /// parameters included (`Sandbox.MaxLocals`).
    pub max_locals: u64,
}

impl Default for CompileLimits {
    /// Several times what the largest agents measured need: the 18 MB
    /// Python component (componentize-py) has 13,481 functions, the
    /// largest 427 KB, nested 781 deep, at most 273 locals in
    /// one function and 79,951 in all; the 12 MB JavaScript one
    /// 12,805, 172 KB, 456 deep, 122 and 86,968 locals.
    fn default() -> Self {
        CompileLimits {
            max_bytes: 64 << 20,
            max_functions: 100_000,
            max_function_bytes: 2 << 20,
            max_nesting: 4_000,
            max_function_locals: 5_000,
            max_locals: 500_000,
        }
    }
}

/// What was read of a component's code, as far as the check went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CodeShape {
    pub functions: u32,
    pub largest_function_bytes: u32,
    pub deepest_nesting: u32,
    /// The most locals of one function, its parameters included.
    pub most_function_locals: u32,
    /// The locals of all functions together, parameters included.
    pub locals: u64,
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
        // Of the core module being read (core modules do not nest): the
        // parameter count of each type, and the type of each function
        // body, in order.
        let mut type_params: Vec<u32> = Vec::new();
        let mut function_types: Vec<u32> = Vec::new();
        let mut body_index: usize = 0;
        for payload in Parser::new(0).parse_all(wasm) {
            let Ok(payload) = payload else {
                return Ok(shape);
            };
            let body = match payload {
                Payload::Version {
                    encoding: Encoding::Module,
                    ..
                } => {
                    type_params.clear();
                    function_types.clear();
                    body_index = 0;
                    continue;
                }
                Payload::TypeSection(types) => {
                    for group in types {
                        let Ok(group) = group else {
                            return Ok(shape);
                        };
                        type_params.extend(group.into_types().map(|ty| match &ty.composite_type.inner {
                            CompositeInnerType::Func(func) => func.params().len() as u32,
                            _ => 0,
                        }));
                    }
                    continue;
                }
                Payload::FunctionSection(functions) => {
                    for ty in functions {
                        let Ok(ty) = ty else {
                            return Ok(shape);
                        };
                        function_types.push(ty);
                    }
                    continue;
                }
                Payload::CodeSectionEntry(body) => body,
                _ => continue,
            };
            let params = function_types
                .get(body_index)
                .and_then(|ty| type_params.get(*ty as usize))
                .copied()
                .unwrap_or(0);
            body_index += 1;
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
            let Ok(declared) = body.get_locals_reader() else {
                return Ok(shape);
            };
            let mut function_locals = u64::from(params);
            for group in declared {
                let Ok((count, _)) = group else {
                    return Ok(shape);
                };
                function_locals += u64::from(count);
                if function_locals > u64::from(self.max_function_locals) {
                    return Err(InvalidAgent(format!(
                        "function {} of the component has more than {} locals (parameters \
                         included), the most this node compiles in one function \
                         (Sandbox.MaxFunctionLocals); raise it if the agent is meant to have \
                         this many",
                        shape.functions - 1,
                        self.max_function_locals
                    )));
                }
            }
            let function_locals = function_locals as u32;
            shape.most_function_locals = shape.most_function_locals.max(function_locals);
            shape.locals += u64::from(function_locals);
            if shape.locals > self.max_locals {
                return Err(InvalidAgent(format!(
                    "the component's functions have more than {} locals together (parameters \
                     included), the most this node compiles (Sandbox.MaxLocals); raise it if \
                     the agent is meant to have this many",
                    self.max_locals
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
        component_with_locals(functions, blocks, 0, 0)
    }

    /// The same, each function of a type of `params` `i64` parameters and
    /// declaring `locals` `i64` locals.
    fn component_with_locals(functions: u32, blocks: u32, params: u32, locals: u32) -> Vec<u8> {
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
        let mut body = Vec::new();
        if locals == 0 {
            body.push(0);
        } else {
            body.push(1);
            leb(locals, &mut body);
            body.push(0x7e);
        }
        for _ in 0..blocks {
            body.extend_from_slice(&[0x02, 0x40]);
        }
        body.extend(std::iter::repeat_n(0x0b, blocks as usize + 1));
        let mut module = b"\0asm\x01\0\0\0".to_vec();
        let mut types = vec![1, 0x60];
        leb(params, &mut types);
        types.extend(std::iter::repeat_n(0x7e, params as usize));
        types.push(0);
        section(1, &types, &mut module);
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
                deepest_nesting: 3,
                most_function_locals: 0,
                locals: 0,
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
            max_function_locals: 1000,
            max_locals: 5000,
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
        let one = refused(component_with_locals(1, 0, 0, 1001));
        assert!(
            one.contains("function 0")
                && one.contains("more than 1000 locals")
                && one.contains("(Sandbox.MaxFunctionLocals)"),
            "{one}"
        );
        let all = refused(component_with_locals(6, 0, 0, 1000));
        assert!(
            all.contains("more than 5000 locals together") && all.contains("(Sandbox.MaxLocals)"),
            "{all}"
        );
        // Parameters are locals too: a shared type of many of them costs
        // the compiler as much as declaring them in each body.
        assert!(refused(component_with_locals(1, 0, 1000, 1)).contains("Sandbox.MaxFunctionLocals"));
        assert!(refused(component_with_locals(1, 0, 600, 401)).contains("Sandbox.MaxFunctionLocals"));
        assert!(refused(component_with_locals(11, 0, 500, 0)).contains("Sandbox.MaxLocals"));
        assert!(limits.check(&component_with_locals(5, 0, 600, 400)).is_ok());
    }

    #[test]
    fn locals_and_parameters_are_measured() {
        let shape = CompileLimits::default()
            .check(&component_with_locals(3, 0, 7, 50_000 - 7))
            .unwrap_err()
            .0;
        assert!(shape.contains("Sandbox.MaxFunctionLocals"), "{shape}");
        let shape = CompileLimits::default()
            .check(&component_with_locals(3, 1, 7, 93))
            .unwrap();
        assert_eq!((shape.most_function_locals, shape.locals), (100, 300));
    }

    #[test]
    fn what_wasmparser_cannot_read_is_left_to_the_compiler() {
        let mut cut = component(10, 3);
        cut.truncate(cut.len() - 5);
        assert!(CompileLimits::default().check(&cut).is_ok());
    }
}
