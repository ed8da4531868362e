//! swarmd root library
