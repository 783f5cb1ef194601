//! The LeaseService wire types and stubs, generated from
//! `proto/lease_service.proto` by `build.rs`. Field names and numbers are
//! the reference's; additions take new numbers.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("lease");
